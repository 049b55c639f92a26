"""FID and KID: pytorch-fid's InceptionV3 in Flax, its weights, features and the metrics."""
