"""Config files and the schema load light and from anywhere: no JAX, Flax or TensorFlow, no
sys.path edits, overlays found beside the file that names them."""

import glob
import os
import runpy
import subprocess
import sys

from absl import flags
from ml_collections import config_flags

from dcgan_jax import config as config_lib

from helpers import REPO, subprocess_env

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))

# Loads the schema and every config file from another working directory, then lists what
# must not have been imported or changed.
LIGHT_SCRIPT = """
import runpy, sys
path_before = list(sys.path)
import dcgan_jax.config
for filename in sys.argv[1:]:
    runpy.run_path(filename)["get_config"]()
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "flax", "tensorflow"})
print("heavy:", heavy, "path_changed:", sys.path != path_before)
"""


def test_schema_and_config_files_import_nothing_heavy(tmp_path):
    # A fresh interpreter: the test process itself has JAX loaded. Under a second.
    result = subprocess.run([sys.executable, "-c", LIGHT_SCRIPT, *CONFIG_FILES], cwd=tmp_path,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "heavy: [] path_changed: False", result.stdout


def test_every_registry_holds_the_names_the_schema_lists():
    from dcgan_jax import augment, losses, models, names
    from dcgan_jax.evaluation import inception
    assert names.MODEL_FAMILIES == tuple(models.FAMILIES)
    assert names.LOSSES == tuple(losses.OBJECTIVES)
    assert names.LOSSES_WITH_TARGETS == tuple(
        name for name, o in losses.OBJECTIVES.items() if o.has_targets)
    assert names.GRADIENT_PENALTIES == ("none", *losses.GRADIENT_PENALTIES)
    assert names.AUGMENTATIONS == tuple(augment.AUGMENTATIONS)
    assert names.FID_DIMS == tuple(inception.BLOCK_BY_DIMS)


def load_with_config_flag(argument):
    """What `--config=ARGUMENT` gives a command line (ml_collections.config_flags)."""
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=values)
    values(["program", f"--config={argument}"])
    return values.config


def test_overlays_load_the_same_by_flag_and_by_path_from_anywhere(tmp_path, monkeypatch):
    path_before = list(sys.path)
    for name in ("celeba64", "celeba128"):
        monkeypatch.chdir(REPO)
        by_flag = load_with_config_flag(f"configs/{name}_msg.py").to_dict()
        monkeypatch.chdir(tmp_path)
        by_path = runpy.run_path(os.path.join(REPO, "configs", f"{name}_msg.py"))
        assert by_path["get_config"]().to_dict() == by_flag
        base = load_with_config_flag(os.path.join(REPO, "configs", f"{name}.py"))
        base.model.msg = True
        assert base.to_dict() == by_flag
        assert by_flag["model"]["msg"] and by_flag["model"]["resolution"] == int(name[6:])
    assert sys.path == path_before
    for filename in CONFIG_FILES:
        with open(filename) as f:
            assert "sys.path" not in f.read(), filename


def test_overlay_finds_the_file_beside_the_caller(tmp_path):
    (tmp_path / "base.py").write_text(
        "from dcgan_jax.config import get_default_config\n\n"
        "def get_config():\n    config = get_default_config()\n"
        "    config.train.batch_size = 8\n    return config\n")
    config = config_lib.overlay("base.py", beside=str(tmp_path / "wide.py"))
    assert config.train.batch_size == 8
    config_lib.validate(config)
