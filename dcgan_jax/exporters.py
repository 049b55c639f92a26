"""A trained generator as files that run without the trainer: StableHLO, ONNX, a SavedModel
and its weights alone (safetensors), with a manifest and a check.

G is exported as `sample` runs it: inference mode (BatchNorm running statistics), the
averaged weights unless told otherwise, float32 whatever the training dtype, images NHWC in
[-1, 1]. Its strided convolutions are flax's plain layers, not the host-tuned CPU forms the
trainer compiles, so the artifact holds nothing of the machine it was made on.

Every export writes `generator.json` (what each file is, the model's inputs and outputs,
where it came from, each file's SHA-256) and `check.npz`: the first latents (and classes)
that `sample files --seed=0` draws and the trainer's float images for them. Each artifact
is run on them before the export is kept, and again by anyone who deploys it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dcgan_jax import __version__, checkpoints, images, parallel, paths
from dcgan_jax import step as step_lib
from dcgan_jax.errors import UserFacingError
from dcgan_jax.names import EXPORT_FORMATS

MANIFEST = "generator.json"
CHECK_FILE = "check.npz"
# The file or folder of each format, relative to the manifest.
FILES = {"stablehlo": "generator.stablehlo", "onnx": "generator.onnx",
         "savedmodel": "savedmodel", "safetensors": "generator.safetensors"}
# The modules each format needs beyond the plain install, and the extra that has them.
NEEDS = {"stablehlo": (), "onnx": ("onnx", "onnxruntime"), "savedmodel": ("tensorflow",),
         "safetensors": ("safetensors",)}
EXTRA = "dcgan_jax[export]"
# Images of check.npz: as many as fit in a glance, and an odd batch beside them.
CHECK_COUNT = 8
CHECK_SEED = 0
# Largest difference an artifact may show from the trainer's images on check.npz.
TOLERANCE = 1e-4
# Platforms a StableHLO artifact is lowered for (any of them runs it).
PLATFORMS = ("cpu", "cuda", "tpu")
# Hidden sibling folders that hold an export while it is written.
PARTIAL_PREFIX = ".export-partial-"


class ExportError(UserFacingError, ValueError):
    """A flag or file that an export cannot use, or an artifact that failed its check."""


@dataclasses.dataclass(frozen=True)
class Generator:
    """A restored generator: its run's config, its float32 variables and where they came
    from."""

    config: Any
    variables: dict
    workdir: str
    step: int
    use_ema: bool
    class_names: tuple[str, ...]

    @property
    def nz(self) -> int:
        return self.config.model.nz

    @property
    def num_classes(self) -> int:
        return self.config.model.num_classes

    def module(self) -> Any:
        """G in flax's plain layers, computing in float32."""
        generator, _ = step_lib.build_models(self.config, dtype=jnp.float32, portable=True)
        return generator

    def function(self) -> Callable[..., jax.Array]:
        """(z [N, nz], labels [N] int32 for a conditional G) -> images [N, H, W, C]."""
        generator, variables = self.module(), self.variables
        if self.num_classes:
            return lambda z, labels: generator.apply(variables, z, labels, train=False)[0]
        return lambda z: generator.apply(variables, z, train=False)[0]


def restore_generator(workdir: str, step: int | None = None,
                      use_ema: bool = True) -> tuple[Generator, step_lib.GANState]:
    """G of checkpoint `step` (the latest when None) of a run, the averaged weights when it
    keeps them and `use_ema`; and the whole restored state. CheckpointError in one line for a
    workdir without checkpoints or a step it does not have."""
    config = checkpoints.read_run_config(workdir)
    mesh = parallel.make_mesh()
    abstract = step_lib.abstract_train_state(config, mesh, total_steps=1)
    state = checkpoints.restore(checkpoints.make_manager(workdir, read_only=True), abstract,
                                step)
    use_ema = use_ema and state.ema is not None
    variables = (state.ema if use_ema
                 else {"params": state.g.params, "batch_stats": state.g.batch_stats})
    variables = jax.tree.map(lambda x: np.asarray(parallel.fetch(x), np.float32), variables)
    step = int(parallel.fetch(state.step))
    generator = Generator(config=config, variables=variables, workdir=workdir, step=step,
                          use_ema=use_ema, class_names=checkpoints.class_names(
                              workdir, step, config.model.num_classes))
    return generator, state


def check_inputs(generator: Generator) -> dict[str, np.ndarray]:
    """The first CHECK_COUNT latents of seed CHECK_SEED, and their classes for a conditional
    G, as `sample files --seed=0` draws them."""
    indices = np.arange(CHECK_COUNT)
    inputs = {"z": np.asarray(step_lib.latent_sequence(CHECK_SEED, jnp.asarray(indices),
                                                       generator.nz))}
    labels = images.sample_classes(indices, generator.num_classes)
    if labels is not None:
        inputs["label"] = labels.astype(np.int32)
    return inputs


def trainer_images(generator: Generator, state: step_lib.GANState,
                   inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The trainer's own G (host-tuned convolutions) on `inputs`, in float32 as `sample`
    runs it: the images every artifact must reproduce."""
    return np.asarray(step_lib.generate_images(
        state, jnp.asarray(inputs["z"]), generator.config, generator.use_ema,
        None if "label" not in inputs else jnp.asarray(inputs["label"]), dtype=jnp.float32))


def missing_modules(formats: list[str]) -> list[tuple[str, str]]:
    """(format, module) for each module a format needs that is not installed."""
    missing = []
    for name in formats:
        for module in NEEDS[name]:
            if importlib.util.find_spec(module) is None:
                missing.append((name, module))
    return missing


def check_formats(formats: list[str]) -> None:
    """ExportError in one line for an unknown format or a converter that is not installed."""
    if not formats:
        raise ExportError(f"--formats is empty; give some of {','.join(EXPORT_FORMATS)}")
    unknown = [name for name in formats if name not in EXPORT_FORMATS]
    if unknown:
        raise ExportError(f"--formats: unknown format {unknown[0]!r}; the formats are "
                          f"{','.join(EXPORT_FORMATS)}")
    if missing := missing_modules(formats):
        name, module = missing[0]
        raise ExportError(f"--formats={name} needs the {module} package, which is not "
                          f"installed: pip install '{EXTRA}'")


# ---------------------------------------------------------------------------- the formats


def _batch_inputs(generator: Generator) -> list[jax.ShapeDtypeStruct]:
    (batch,) = jax.export.symbolic_shape("batch")
    inputs = [jax.ShapeDtypeStruct((batch, generator.nz), jnp.float32)]
    if generator.num_classes:
        inputs.append(jax.ShapeDtypeStruct((batch,), jnp.int32))
    return inputs


def write_stablehlo(generator: Generator, path: str) -> None:
    """`jax.export` of G with a symbolic batch size and the weights inside, for PLATFORMS."""
    exported = jax.export.export(jax.jit(generator.function()),
                                 platforms=PLATFORMS)(*_batch_inputs(generator))
    with open(path, "wb") as f:
        f.write(exported.serialize())


def run_stablehlo(path: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(*inputs.values()))


def write_onnx(generator: Generator, path: str) -> None:
    """G's layers as ONNX operators (`onnx_graph`)."""
    import onnx

    from dcgan_jax import onnx_graph
    model = onnx_graph.generator_model(generator.module(), generator.variables, generator.nz)
    onnx.save(model, path)


def run_onnx(path: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["images"], inputs)[0]


def _tensorflow() -> Any:
    """TensorFlow on the CPU alone, without its start-up notices."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    return tf


def write_savedmodel(generator: Generator, path: str) -> None:
    """`jax2tf` of G (native serialization, the weights inside), saved as a tf.Module whose
    `serving_default` signature (what TF Serving calls) maps z (and label) to images."""
    tf = _tensorflow()
    from jax.experimental import jax2tf
    shapes = ["(b, _)", "(b,)"][:1 + bool(generator.num_classes)]
    converted = jax2tf.convert(generator.function(), polymorphic_shapes=shapes,
                               with_gradient=False, native_serialization_platforms=PLATFORMS)
    specs = [tf.TensorSpec([None, generator.nz], tf.float32, name="z")]
    if generator.num_classes:
        specs.append(tf.TensorSpec([None], tf.int32, name="label"))
    module = tf.Module()
    module.generate = tf.function(lambda *args: {"images": converted(*args)},
                                  input_signature=specs, autograph=False)
    tf.saved_model.save(module, path, signatures={"serving_default": module.generate})


def run_savedmodel(path: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    tf = _tensorflow()
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return serve(**{name: tf.constant(value) for name, value in inputs.items()})[
        "images"].numpy()


def flat_variables(variables: dict) -> dict[str, np.ndarray]:
    """'params/ConvTranspose_0/kernel' -> array: G's variables by their Flax names."""
    flat = {}
    for keys, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(key.key) for key in keys)] = np.asarray(value)
    return flat


def write_safetensors(generator: Generator, path: str) -> None:
    """G's parameters and BatchNorm statistics alone, by their Flax names."""
    from safetensors.numpy import save_file
    save_file(flat_variables(generator.variables), path,
              metadata={"format": "dcgan_jax generator variables", "manifest": MANIFEST})


def check_safetensors(generator: Generator, path: str) -> float:
    """0 when the file holds exactly G's variables; ExportError otherwise."""
    from safetensors.numpy import load_file
    ours, theirs = flat_variables(generator.variables), load_file(path)
    if set(ours) != set(theirs) or any(not np.array_equal(ours[k], theirs[k]) for k in ours):
        raise ExportError(f"{path} does not hold G's variables as written")
    return 0.0


WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx, "savedmodel": write_savedmodel,
           "safetensors": write_safetensors}
RUNNERS = {"stablehlo": run_stablehlo, "onnx": run_onnx, "savedmodel": run_savedmodel}


# ---------------------------------------------------------------------------- the export


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: str) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the manifest, by its path relative to it."""
    hashes = {}
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST:
                hashes[relative] = sha256(path)
    return hashes


def manifest(generator: Generator, formats: list[str], errors: dict[str, float],
             folder: str) -> dict[str, Any]:
    m = generator.config.model
    inputs = {"z": {"shape": ["batch", m.nz], "dtype": "float32",
                    "distribution": "standard normal, N(0, 1) per entry"}}
    if generator.num_classes:
        inputs["label"] = {"shape": ["batch"], "dtype": "int32",
                           "range": [0, generator.num_classes - 1]}
    return {
        "format_version": 1,
        "producer": f"dcgan_jax {__version__}",
        "files": {name: FILES[name] for name in formats},
        "model": {"family": m.family, "resolution": m.resolution, "channels": m.channels,
                  "nz": m.nz, "num_classes": generator.num_classes, "msg": m.msg,
                  "msg_output": "full resolution only" if m.msg else None,
                  **({"class_names": list(generator.class_names)} if generator.num_classes
                     else {})},
        "inputs": inputs,
        "output": {"name": "images", "shape": ["batch", m.resolution, m.resolution,
                                               m.channels],
                   "dtype": "float32", "layout": "NHWC", "range": [-1.0, 1.0],
                   "to_uint8": "clip(rint((x + 1) * 127.5), 0, 255)"},
        "source": {"workdir": paths.absolute(generator.workdir), "step": generator.step,
                   "ema": generator.use_ema, "trained_dtype": generator.config.dtype,
                   "exported_dtype": "float32"},
        "check": {"file": CHECK_FILE, "seed": CHECK_SEED, "count": CHECK_COUNT,
                  "arrays": "z, label (conditional G), images",
                  "tolerance": TOLERANCE, "max_abs_error": errors},
        "sha256": file_hashes(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_output_folder(out: str) -> None:
    """ExportError in one line unless `out` can take an export: a local path that is new, an
    empty folder, or a folder holding an earlier export (replaced whole)."""
    if paths.is_remote(out):
        raise ExportError(f"--out={out}: exports are written to a local folder; copy the "
                          f"folder to the bucket afterwards")
    if os.path.isfile(out):
        raise ExportError(f"--out={out} is a file; give a folder for the export")
    if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(
            os.path.join(out, MANIFEST)):
        raise ExportError(f"--out={out} is a folder of other files; give a new or empty "
                          f"folder, or one that holds an earlier export")


def _put_in_place(partial: str, out: str) -> None:
    """The finished export at `out`: renames only, so `out` holds the old export or the new
    one whole, never a mixture."""
    old = None
    if os.path.exists(out):
        old = f"{partial}.old"
        os.rename(out, old)
    os.rename(partial, out)
    if old:
        shutil.rmtree(old)


def remove_partial_exports(parent: str) -> None:
    """Folders left by exports that were killed part-way (never a finished export)."""
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if name.startswith(PARTIAL_PREFIX):
                shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def export(generator: Generator, state: step_lib.GANState, formats: list[str], out: str,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes each format of G, check.npz and generator.json to the folder `out`, checking
    every artifact on check.npz first; returns the manifest.

    Everything is written to a hidden sibling folder and renamed into place at the end: an
    export stopped part-way leaves `out` as it was.
    """
    check_formats(formats)
    check_output_folder(out)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    remove_partial_exports(parent)
    partial = os.path.join(parent, f"{PARTIAL_PREFIX}{os.path.basename(out)}-{os.getpid()}")
    os.makedirs(partial)
    try:
        inputs = check_inputs(generator)
        expected = trainer_images(generator, state, inputs)
        np.savez(os.path.join(partial, CHECK_FILE), **inputs, images=expected)
        errors = {}
        for name in formats:
            path = os.path.join(partial, FILES[name])
            started = time.perf_counter()
            WRITERS[name](generator, path)
            errors[name] = verify(generator, name, path, inputs, expected)
            say(f"{name}: {FILES[name]} written in {time.perf_counter() - started:.1f} s, "
                f"max |difference| from the trainer's images {errors[name]:.2e}")
        record = manifest(generator, formats, errors, partial)
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        _put_in_place(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def verify(generator: Generator, name: str, path: str, inputs: dict[str, np.ndarray],
           expected: np.ndarray) -> float:
    """The largest difference of the artifact's images from `expected`, at batch sizes 1
    and CHECK_COUNT from the one artifact; ExportError beyond TOLERANCE."""
    if name == "safetensors":
        return check_safetensors(generator, path)
    run = RUNNERS[name]
    first = {key: value[:1] for key, value in inputs.items()}
    error = max(float(np.max(np.abs(run(path, inputs) - expected))),
                float(np.max(np.abs(run(path, first) - expected[:1]))))
    if not error <= TOLERANCE:
        raise ExportError(f"the {name} artifact's images differ from the trainer's by "
                          f"{error:.2e} (more than {TOLERANCE}); nothing was written")
    return error
