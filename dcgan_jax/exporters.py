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
import importlib.util
import json
import os
import shutil
import socket
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
# Hidden sibling folders of --out: an export while it is written, and an earlier export while
# the new one is renamed into its place; named PREFIX<pid>+<host>+<name of --out>.
PARTIAL_PREFIX = ".export-partial-"
REPLACED_PREFIX = ".export-replaced-"
# An earlier export's manifest is read only up to this size.
MAX_MANIFEST_BYTES = 1 << 20


class ExportError(UserFacingError, ValueError):
    """A flag or file that an export cannot use, or an artifact that failed its check."""


@dataclasses.dataclass(frozen=True)
class RestoredGenerator:
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
                      use_ema: bool = True) -> tuple[RestoredGenerator, step_lib.GANState]:
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
    generator = RestoredGenerator(config=config, variables=variables, workdir=workdir, step=step,
                          use_ema=use_ema, class_names=checkpoints.class_names(
                              workdir, step, config.model.num_classes))
    return generator, state


def check_example_inputs(generator: RestoredGenerator) -> dict[str, np.ndarray]:
    """The first CHECK_COUNT latents of seed CHECK_SEED, and their classes for a conditional
    G, as `sample files --seed=0` draws them."""
    indices = np.arange(CHECK_COUNT)
    inputs = {"z": np.asarray(step_lib.latent_sequence(CHECK_SEED, jnp.asarray(indices),
                                                       generator.nz))}
    labels = images.sample_classes(indices, generator.num_classes)
    if labels is not None:
        inputs["label"] = labels.astype(np.int32)
    return inputs


def trainer_images(generator: RestoredGenerator, state: step_lib.GANState,
                   inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The trainer's own G (host-tuned convolutions) on `inputs`, in float32 as `sample`
    runs it: the images every artifact must reproduce."""
    return np.asarray(step_lib.generate_images(
        state, jnp.asarray(inputs["z"]), generator.config, generator.use_ema,
        None if "label" not in inputs else jnp.asarray(inputs["label"])))


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


def _batch_inputs(generator: RestoredGenerator) -> list[jax.ShapeDtypeStruct]:
    (batch,) = jax.export.symbolic_shape("batch")
    inputs = [jax.ShapeDtypeStruct((batch, generator.nz), jnp.float32)]
    if generator.num_classes:
        inputs.append(jax.ShapeDtypeStruct((batch,), jnp.int32))
    return inputs


def write_stablehlo(generator: RestoredGenerator, path: str) -> None:
    """`jax.export` of G with a symbolic batch size and the weights inside, for PLATFORMS."""
    exported = jax.export.export(jax.jit(generator.function()),
                                 platforms=PLATFORMS)(*_batch_inputs(generator))
    with open(path, "wb") as f:
        f.write(exported.serialize())


def run_stablehlo(path: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(*inputs.values()))


def write_onnx(generator: RestoredGenerator, path: str) -> None:
    """G's layers as ONNX operators (`onnx_graph`)."""
    import onnx

    from dcgan_jax import onnx_graph
    model = onnx_graph.generator_model(generator.module(), generator.variables, generator.nz)
    onnx.save(model, path)


def run_onnx(path: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(["images"], inputs)[0]


def tensorflow_on_cpu() -> Any:
    """TensorFlow, kept off the GPUs where it has not touched a device yet (JAX holds them;
    the conversion and its check need none)."""
    import tensorflow as tf
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF already runs on its devices (a notebook): leave them
        pass
    return tf


def write_savedmodel(generator: RestoredGenerator, path: str) -> None:
    """`jax2tf` of G (native serialization, the weights inside), saved as a tf.Module whose
    `serving_default` signature (what TF Serving calls) maps z (and label) to images."""
    tf = tensorflow_on_cpu()
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
    tf = tensorflow_on_cpu()
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return serve(**{name: tf.constant(value) for name, value in inputs.items()})[
        "images"].numpy()


def flat_variables(variables: dict) -> dict[str, np.ndarray]:
    """'params/ConvTranspose_0/kernel' -> array: G's variables by their Flax names."""
    flat = {}
    for keys, value in jax.tree_util.tree_flatten_with_path(variables)[0]:
        flat["/".join(str(key.key) for key in keys)] = np.asarray(value)
    return flat


def write_safetensors(generator: RestoredGenerator, path: str) -> None:
    """G's parameters and BatchNorm statistics alone, by their Flax names."""
    from safetensors.numpy import save_file
    save_file(flat_variables(generator.variables), path,
              metadata={"format": "dcgan_jax generator variables", "manifest": MANIFEST})


def check_safetensors(generator: RestoredGenerator, path: str) -> None:
    """ExportError unless the file holds exactly G's variables."""
    from safetensors.numpy import load_file
    ours, theirs = flat_variables(generator.variables), load_file(path)
    if set(ours) != set(theirs) or any(not np.array_equal(ours[k], theirs[k]) for k in ours):
        raise ExportError(f"{path} does not hold G's variables as written")


WRITERS = {"stablehlo": write_stablehlo, "onnx": write_onnx, "savedmodel": write_savedmodel,
           "safetensors": write_safetensors}
RUNNERS = {"stablehlo": run_stablehlo, "onnx": run_onnx, "savedmodel": run_savedmodel}


# ---------------------------------------------------------------------------- the export


def file_hashes(folder: str) -> dict[str, str]:
    """SHA-256 of every file under `folder` but the manifest, by its path relative to it."""
    hashes = {}
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder).replace(os.sep, "/")
            if relative != MANIFEST:
                hashes[relative] = paths.sha256(path)
    return hashes


def runtime_versions(formats: list[str], folder: str) -> dict[str, Any]:
    """What made each artifact in `folder`, for whoever checks that a runtime can load it."""
    versions: dict[str, Any] = {"jax": jax.__version__}
    if "stablehlo" in formats:
        with open(os.path.join(folder, FILES["stablehlo"]), "rb") as f:
            exported = jax.export.deserialize(bytearray(f.read()))
        versions["jax_export_calling_convention"] = exported.calling_convention_version
    if "onnx" in formats:
        import onnx

        from dcgan_jax import onnx_graph
        versions |= {"onnx": onnx.__version__, "onnx_opset": onnx_graph.OPSET}
    if "savedmodel" in formats:
        versions["tensorflow"] = tensorflow_on_cpu().__version__
    return versions


def manifest(generator: RestoredGenerator, formats: list[str], errors: dict[str, Any],
             folder: str) -> dict[str, Any]:
    m = generator.config.model
    inputs = {"z": {"shape": ["batch", m.nz], "dtype": "float32",
                    "distribution": "standard normal, N(0, 1) per entry"}}
    if generator.num_classes:
        inputs["label"] = {"shape": ["batch"], "dtype": "int32",
                           "range": [0, generator.num_classes - 1]}
    model = {"family": m.family, "resolution": m.resolution, "channels": m.channels,
             "nz": m.nz, "num_classes": generator.num_classes, "msg": m.msg}
    if m.msg:
        model["msg_output"] = "the full-resolution images only"
    if generator.num_classes:
        model["class_names"] = list(generator.class_names)
    return {
        "format_version": 1,
        "producer": f"dcgan_jax {__version__}",
        "files": {name: FILES[name] for name in formats},
        "model": model,
        "inputs": inputs,
        "output": {"name": "images", "shape": ["batch", m.resolution, m.resolution,
                                               m.channels],
                   "dtype": "float32", "layout": "NHWC", "range": [-1.0, 1.0],
                   "to_uint8": "clip(rint((x + 1) * 127.5), 0, 255)"},
        "source": {"workdir": paths.absolute(generator.workdir), "step": generator.step,
                   "ema": generator.use_ema, "trained_dtype": generator.config.dtype,
                   "exported_dtype": "float32"},
        "versions": runtime_versions(formats, folder),
        "check": {"file": CHECK_FILE, "seed": CHECK_SEED, "count": CHECK_COUNT,
                  "arrays": "z, label (conditional G), images",
                  "tolerance": TOLERANCE, "max_abs_error": errors},
        "sha256": file_hashes(folder),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def earlier_export_files(folder: str) -> list[str] | None:
    """The files of the export in `folder`, if it holds one and nothing else: its manifest
    and the files the manifest's hashes list. None otherwise."""
    path = os.path.join(folder, MANIFEST)
    try:
        if os.path.getsize(path) > MAX_MANIFEST_BYTES:
            return None
        with open(path) as f:
            listed = set(json.load(f)["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    present = set(file_hashes(folder))
    return sorted(present) if present <= listed else None


def check_output_folder(out: str) -> None:
    """ExportError in one line unless `out` can take an export: a local path that is new, an
    empty folder, or a folder holding an earlier export and nothing else (replaced whole)."""
    if paths.is_remote(out):
        raise ExportError(f"--out={out}: exports are written to a local folder; copy the "
                          f"folder to the bucket afterwards")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--out={out} is a file; give a folder for the export")
    if os.path.isdir(out) and os.listdir(out) and earlier_export_files(out) is None:
        raise ExportError(f"--out={out} holds files that are not an earlier export's; give a "
                          f"new or empty folder, or one that holds an export and nothing else")


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process that named a folder PREFIX<pid>+<host>+<out> still runs (an
    unreadable name, or another host's process, counts as alive: left alone)."""
    pid, host, _ = (name[len(prefix):].split("+", 2) + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _recover(parent: str, out: str) -> None:
    """Undoes what exports killed part-way left in `parent`: their unfinished folders are
    removed, and an earlier export moved aside for the new one is put back if the new one
    never arrived. Folders of exports still running are left alone."""
    for name in sorted(os.listdir(parent)):
        path = os.path.join(parent, name)
        if name.startswith(PARTIAL_PREFIX) and not _owner_alive(name, PARTIAL_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(REPLACED_PREFIX) and not _owner_alive(name, REPLACED_PREFIX):
            target = os.path.join(parent, name.split("+", 2)[-1])
            if os.path.exists(target):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, target)


def _put_in_place(partial: str, out: str, replaced: str) -> None:
    """The finished export at `out`: renames only, so `out` holds the old export or the new
    one whole; a kill between the renames leaves the old one at `replaced`, which the next
    export to this parent puts back (`_recover`)."""
    if os.path.exists(out):
        os.rename(out, replaced)
    os.rename(partial, out)
    shutil.rmtree(replaced, ignore_errors=True)


def export(generator: RestoredGenerator, state: step_lib.GANState, formats: list[str], out: str,
           say: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes each format of G, check.npz and generator.json to the folder `out`, checking
    every artifact on check.npz first; returns the manifest.

    Everything is written to a hidden sibling folder and renamed into place at the end: an
    export stopped part-way leaves `out` as it was.
    """
    check_formats(formats)
    check_output_folder(out)
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    owner = f"{os.getpid()}+{socket.gethostname()}+{name}"
    partial = os.path.join(parent, PARTIAL_PREFIX + owner)
    try:
        os.makedirs(parent, exist_ok=True)
        _recover(parent, out)
        os.makedirs(partial)
    except OSError as error:
        raise ExportError(f"--out={out}: cannot write there ({error.strerror or error})"
                          ) from None
    try:
        inputs = check_example_inputs(generator)
        expected = trainer_images(generator, state, inputs)
        np.savez(os.path.join(partial, CHECK_FILE), **inputs, images=expected)
        errors: dict[str, Any] = {}
        for format_name in formats:
            path = os.path.join(partial, FILES[format_name])
            started = time.perf_counter()
            errors[format_name] = _write_and_verify(generator, format_name, path, inputs,
                                                    expected)
            checked = (f"its variables read back {errors[format_name]}"
                       if isinstance(errors[format_name], str) else
                       f"max |difference| from the trainer's images {errors[format_name]:.2e}")
            say(f"{format_name}: {FILES[format_name]} written in "
                f"{time.perf_counter() - started:.1f} s, {checked}")
        record = manifest(generator, formats, errors, partial)
        with open(os.path.join(partial, MANIFEST), "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
        _put_in_place(partial, out, os.path.join(parent, REPLACED_PREFIX + owner))
    except OSError as error:
        raise ExportError(f"writing the export to {out} failed: "
                          f"{error.strerror or error}; nothing was written") from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return record


def _write_and_verify(generator: RestoredGenerator, name: str, path: str,
                      inputs: dict[str, np.ndarray], expected: np.ndarray) -> float | str:
    """Writes format `name` and checks it (`verify`); a converter's or runtime's own failure
    becomes one line naming the format."""
    try:
        WRITERS[name](generator, path)
        return verify(generator, name, path, inputs, expected)
    except (ExportError, OSError):
        raise
    except Exception as error:  # the converters and runtimes raise many types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"the {name} export failed: {type(error).__name__}: {first}; "
                          f"nothing was written") from None


def verify(generator: RestoredGenerator, name: str, path: str, inputs: dict[str, np.ndarray],
           expected: np.ndarray) -> float | str:
    """The largest difference of the artifact's images from `expected`, at batch sizes 1
    and CHECK_COUNT from the one artifact; ExportError beyond TOLERANCE. The safetensors
    file holds no computation: it is read back and compared, 'identical' or an error."""
    if name == "safetensors":
        check_safetensors(generator, path)
        return "identical"
    run = RUNNERS[name]
    first = {key: value[:1] for key, value in inputs.items()}
    error = max(float(np.max(np.abs(run(path, inputs) - expected))),
                float(np.max(np.abs(run(path, first) - expected[:1]))))
    if not error <= TOLERANCE:
        raise ExportError(f"the {name} artifact's images differ from the trainer's by "
                          f"{error:.2e} (more than {TOLERANCE}); nothing was written")
    return error
