"""Every set of names a config field picks from, in one place that imports nothing.

config.py validates against these lists, and each module that implements the names keys its
registry by them (tests/test_config_files.py checks that every registry has exactly these
names), so the schema loads without JAX and a new entry is added in two places at most.
"""

# Stride-2 blocks run from 4x4 to the resolution, a power of two in this range.
MIN_RESOLUTION = 32
MAX_RESOLUTION = 256

# Model families (models.FAMILIES) and their options.
MODEL_FAMILIES = ("dcgan",)
MSG_COMBINES = ("simple", "lin_cat", "cat_lin")
D_NORMS = ("batch", "spectral", "none")
# How G takes a class: a learned embedding joined to z, or class-conditional BatchNorm.
G_CONDITIONINGS = ("concat", "cbn")
# How D takes a class: one-hot maps joined to its input, or a projection of its features.
D_CONDITIONINGS = ("concat", "projection")

# Objectives (losses.OBJECTIVES), the ones with real/fake targets, penalties, augmentations.
LOSSES = ("ns", "hinge", "wgan", "lsgan")
LOSSES_WITH_TARGETS = ("ns", "lsgan")
GRADIENT_PENALTIES = ("none", "wgan_gp", "r1")
AUGMENTATIONS = ("color", "translation", "cutout")

DTYPES = ("float32", "bfloat16")

# Data sources (data.sources.SOURCES), by the prefix of config.dataset.
SOURCE_KINDS = ("demo", "tfds", "folder", "kaggle")
PREPARED_MODES = ("auto", "off")

# Inception features FID can use (evaluation.inception.BLOCK_BY_DIMS).
FID_DIMS = (64, 192, 768, 2048)
# What config.eval.metrics (and evaluate's --metrics) can ask for, and the values each gives
# (metrics.jsonl's and TensorBoard's names): FID, KID, the Inception Score, precision and
# recall, density and coverage, and the memorisation check (evaluation.metrics.score).
METRIC_VALUES = {"fid": ("fid",), "kid": ("kid", "kid_std"), "is": ("is", "is_std"),
                 "pr": ("precision", "recall"), "dc": ("density", "coverage"),
                 "mem": ("memorisation",)}
EVAL_METRICS = tuple(METRIC_VALUES)
# The values config.eval.best_metric can rank checkpoints by: higher is better for these,
# lower for the others.
HIGHER_IS_BETTER = ("is", "precision", "recall", "density", "coverage")
BEST_METRICS = tuple(value for values in METRIC_VALUES.values() for value in values
                     if not value.endswith("_std"))

# What `python -m dcgan_jax.export` writes (exporters.FILES).
EXPORT_FORMATS = ("stablehlo", "onnx", "savedmodel", "safetensors")
