"""Importing dcgan_jax changes nothing process-wide: the command lines make their settings in
`dcgan_jax.cli.set_up_process`, and a program that imports the library keeps its own."""

from __future__ import annotations

import json

from helpers import run

# Every library module but the command lines (main, prepare, sample, evaluate: they define
# absl flags) and those that import TensorFlow (reporting, resume, train: TensorFlow sets
# environment variables of its own when imported).
LIBRARY_MODULES = [
    "dcgan_jax.augment", "dcgan_jax.checkpoints", "dcgan_jax.cli", "dcgan_jax.config",
    "dcgan_jax.data", "dcgan_jax.errors", "dcgan_jax.evaluation.evaluator",
    "dcgan_jax.evaluation.features", "dcgan_jax.evaluation.inception",
    "dcgan_jax.evaluation.metrics", "dcgan_jax.evaluation.weights", "dcgan_jax.host_cpu",
    "dcgan_jax.images", "dcgan_jax.losses", "dcgan_jax.models", "dcgan_jax.names",
    "dcgan_jax.parallel", "dcgan_jax.paths", "dcgan_jax.prepared", "dcgan_jax.signals",
    "dcgan_jax.step", "dcgan_jax.strided_conv", "dcgan_jax.workdir",
]

# Starts without the variables that the test process has from `cli.set_up_process`. First
# the modules a config file needs, which must not load JAX; then JAX (which sets variables of
# its own), as a program that uses the library has it; then the package again (its code with
# JAX loaded) and every module. Prints what changed.
SCRIPT = """
import importlib, json, os, sys
for key in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_THREEFRY_PARTITIONABLE"):
    os.environ.pop(key, None)

def changes(before, after):
    return {key: [repr(before.get(key)), repr(after.get(key))]
            for key in before.keys() | after.keys() if before.get(key) != after.get(key)}

environ = dict(os.environ)
import dcgan_jax, dcgan_jax.config, dcgan_jax.names
light_imports = {"loaded": sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax"}),
                 "environ": changes(environ, dict(os.environ))}
import jax
import PIL.Image
environ, settings = dict(os.environ), dict(jax.config.values)
max_pixels = PIL.Image.MAX_IMAGE_PIXELS
importlib.reload(dcgan_jax)
for name in sys.argv[1:]:
    importlib.import_module(name)
from dcgan_jax.strided_conv import CpuForms

print(json.dumps({
    "light_imports": light_imports,
    "jax_config": changes(settings, dict(jax.config.values)),
    "environ": changes(environ, dict(os.environ)),
    "max_image_pixels": [max_pixels, PIL.Image.MAX_IMAGE_PIXELS],
    "host_forms_read": CpuForms.of_host.cache_info().currsize,
}))
"""


def test_importing_the_library_changes_no_process_wide_setting():
    """One fresh interpreter (the test process has the settings of the command lines)."""
    result = json.loads(run(["-c", SCRIPT, *LIBRARY_MODULES], timeout=300)
                        .stdout.splitlines()[-1])
    assert result["light_imports"] == {"loaded": [], "environ": {}}, "nor load JAX"
    assert result["jax_config"] == {}
    assert result["environ"] == {}
    before, after = result["max_image_pixels"]
    assert after == before, "Pillow's decompression-bomb limit is the program's to set"
    assert result["host_forms_read"] == 0, "the host's CPU forms are read when first traced"
