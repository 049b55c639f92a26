"""The InceptionV3 of pytorch-fid, in Flax: TensorFlow's inception-2015-12-05 graph.

It differs from torchvision's InceptionV3 as pytorch-fid's `fid_inception_v3` does: average
pooling inside the blocks excludes padding, the last block max-pools, and the classifier has
1008 classes. Modules carry pytorch-fid's names, so its state dict maps onto them one to one.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
# Feature widths pytorch-fid offers, and the block whose output each one is.
BLOCK_BY_DIMS = {64: 0, 192: 1, 768: 2, 2048: 3}
# The classifier's classes: its logits give the Inception Score.
NUM_LOGITS = 1008
Pad = int | tuple[int, int]


class BasicConv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3) in inference mode, ReLU."""

    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: Pad = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = (self.padding, self.padding) if isinstance(self.padding, int) else self.padding
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class InceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=2, name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """The last blocks; `max_pool` selects the pooling branch of the final one (Mixed_7c)."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = (nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
                  if self.max_pool else _avg_pool_3x3(x))
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Spatially averaged features of the block that `dims` names, from images in [-1, 1]
    at 299x299 (NHWC). Blocks after that one are neither built nor run.

    With `logits` (dims 2048 only), each row is followed by the classifier's 1008 logits
    without its bias, torch-fidelity's `logits_unbiased`, from which it computes the
    Inception Score: one pass gives FID's features and IS's logits."""

    dims: int = 2048
    logits: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        last = BLOCK_BY_DIMS[self.dims]
        x = BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        if last >= 1:
            x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
            x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
            x = _max_pool_3x3_s2(x)
        if last >= 2:
            x = InceptionA(32, name="Mixed_5b")(x)
            x = InceptionA(64, name="Mixed_5c")(x)
            x = InceptionA(64, name="Mixed_5d")(x)
            x = InceptionB(name="Mixed_6a")(x)
            for name, width in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                                ("Mixed_6e", 192)):
                x = InceptionC(width, name=name)(x)
        if last >= 3:
            x = InceptionD(name="Mixed_7a")(x)
            x = InceptionE(name="Mixed_7b")(x)
            x = InceptionE(max_pool=True, name="Mixed_7c")(x)
        pool = x.mean(axis=(1, 2))
        if not self.logits:
            return pool
        if self.dims != 2048:
            raise ValueError(f"the logits follow the 2048-d features, not dims={self.dims}")
        logits = nn.Dense(NUM_LOGITS, use_bias=False, name="fc",
                          precision=jax.lax.Precision.HIGHEST)(pool)
        return jnp.concatenate([pool, logits], axis=-1)


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 NHWC images of any size -> [-1, 1] at 299x299, as pytorch-fid prepares them:
    [0, 1], bilinear resize without antialiasing (align_corners=False), then 2x - 1."""
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # PIL's convert("RGB") of a grayscale image
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                         antialias=False)
    return 2.0 * x - 1.0


def torch_key(path: Sequence[str]) -> str:
    """pytorch-fid's state-dict key of a Flax variable path."""
    *modules, leaf = path
    if modules[-1] == "conv" or leaf == "kernel":
        return ".".join(modules) + ".weight"
    names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    return ".".join(modules + [names[leaf]])


def abstract_variables(dims: int = 2048, logits: bool = False) -> Any:
    """Shapes of the network's variables, without computing them."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3(dims, logits).init, jax.random.PRNGKey(0), x)


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], dims: int = 2048,
                              source: str = "the weights file",
                              logits: bool = False) -> dict[str, Any]:
    """Flax variables from pytorch-fid's state dict (torch layout, as numpy arrays).

    Raises ValueError naming the first key that is missing or has the wrong shape.
    """
    abstract = abstract_variables(dims, logits)
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        names = [p.key for p in path]
        key = torch_key(names[1:])  # names[0] is params or batch_stats
        if key not in state_dict:
            raise ValueError(f"{source} has no {key!r}; it is not pytorch-fid's InceptionV3 "
                             f"(pt_inception-2015-12-05)")
        value = np.asarray(state_dict[key], dtype=np.float32)
        shape = leaf.shape
        if len(shape) == 4:  # Flax HWIO; torch OIHW
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif names[-1] == "kernel":  # Flax [in, out]; torch [out, in]
            shape = shape[::-1]
        if value.shape != shape:
            raise ValueError(
                f"{source}: {key!r} has shape {tuple(value.shape)} where pytorch-fid's "
                f"InceptionV3 has {shape}; it is not pt_inception-2015-12-05")
        if value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif names[-1] == "kernel":
            value = value.T
        flat[tuple(names)] = value
    return jax.tree_util.tree_map_with_path(
        lambda path, _: flat[tuple(p.key for p in path)], abstract)
