"""Every config error is caught before compiling, in one line that names the field."""

import os
import re

import ml_collections
import pytest

from dcgan_jax import config as config_lib

from helpers import main_args, run
from tiny_config import tiny_config

BAD_VALUES = [
    ({"eval__dims": 100}, "config.eval.dims=100 must be one of (64, 192, 768, 2048)"),
    ({"eval__num_samples": 1}, "config.eval.num_samples=1 must be at least 2"),
    ({"eval__every": -1}, "config.eval.every=-1 must be 0 (no evaluation) or more"),
    ({"eval__num_reference": 1}, "config.eval.num_reference=1 must be 0 (all) or at least 2"),
    ({"model__resolution": 48}, "config.model.resolution=48 must be a power of two"),
    ({"model__resolution": 16}, "config.model.resolution=16 must be a power of two"),
    ({"model__resolution": 512}, "config.model.resolution=512 must be a power of two"),
    ({"model__channels": 2}, "config.model.channels=2 must be 1 or 3"),
    ({"model__ngf": 0}, "config.model.ngf=0 must be at least 1"),
    ({"model__msg_combine": "add"}, "config.model.msg_combine='add' must be one of"),
    ({"dtype": "float16"}, "config.dtype='float16' must be one of"),
    ({"dataset": "imagenet"}, "config.dataset='imagenet' must be"),
    ({"data__crop": "1,2,3"}, "config.data.crop='1,2,3' must be"),
    ({"data__num_workers": -2}, "config.data.num_workers=-2 must be -1 (one per core), 0"),
    ({"data__prepared": "yes"}, "config.data.prepared='yes' must be one of ('auto', 'off')"),
    ({"train__batch_size": 0}, "config.train.batch_size=0 must be at least 1"),
    ({"train__num_epochs": 0, "train__num_steps": 0}, "config.train.num_epochs or"),
    ({"train__lr_d": 0.0}, "config.train.lr_d=0.0 must be positive"),
    ({"train__beta1": 1.0}, "config.train.beta1=1.0 must be in [0, 1)"),
    ({"train__d_steps": 0}, "config.train.d_steps=0 must be at least 1"),
    ({"train__label_smoothing": 1.0}, "config.train.label_smoothing=1.0 must be in [0, 1)"),
    ({"train__ema_decay": 1.0}, "config.train.ema_decay=1.0 must be in [0, 1)"),
    ({"log_every": 0}, "config.log_every=0 must be at least 1"),
    ({"sample_every_epochs": -1.0}, "config.sample_every_epochs=-1.0 must be 0 (use "
                                    "sample_every) or more"),
    ({"ckpt_every_epochs": -2.0}, "config.ckpt_every_epochs=-2.0 must be 0"),
    ({"eval__every_epochs": -1.0}, "config.eval.every_epochs=-1.0 must be 0 (use eval.every)"),
    ({"sample_grid": "4x0"}, "config.sample_grid='4x0' must be ROWSxCOLS, e.g. '4x8'"),
    ({"sample_grid": "four"}, "config.sample_grid='four' must be ROWSxCOLS"),
    ({"model__leaky_slope": 1.0}, "config.model.leaky_slope=1.0 must be in [0, 1)"),
    ({"model__leaky_slope": -0.1}, "config.model.leaky_slope=-0.1 must be in [0, 1)"),
    ({"train__loss": "bce"}, "config.train.loss='bce' must be one of ('ns', 'hinge', 'wgan'"),
    ({"train__gradient_penalty": "gp"}, "config.train.gradient_penalty='gp' must be one of"),
    ({"train__gp_weight": 0.0}, "config.train.gp_weight=0.0 must be positive"),
    ({"train__gp_weight": -10.0}, "config.train.gp_weight=-10.0 must be positive"),
    ({"model__d_norm": "layer"}, "config.model.d_norm='layer' must be one of ('batch', "),
    ({"train__augment": "colour"}, "config.train.augment='colour' must be empty or a comma"),
    ({"train__augment": "color, cutout"}, "config.train.augment='color, cutout' must be"),
    ({"train__augment": "cutout,cutout"}, "config.train.augment='cutout,cutout' must be"),
    ({"train__augment": "color,"}, "config.train.augment='color,' must be"),
    ({"train__loss": "hinge", "train__label_smoothing": 0.1},
     "config.train.label_smoothing=0.1 needs a loss with targets, and "
     "config.train.loss='hinge' has none"),
    ({"train__gradient_penalty": "wgan_gp"},
     "config.train.gradient_penalty='wgan_gp' needs config.model.d_norm='spectral' or 'none', "
     "not 'batch'"),
    ({"train__gradient_penalty": "r1"}, "config.train.gradient_penalty='r1' needs "
                                        "config.model.d_norm='spectral' or 'none'"),
    ({"train__loss": "wgan", "model__d_norm": "none"},
     "config.train.loss='wgan' needs config.train.gradient_penalty='wgan_gp' or "
     "config.model.d_norm='spectral'"),
    ({"train__loss": "wgan", "train__gradient_penalty": "r1", "model__d_norm": "none"},
     "config.train.loss='wgan' needs"),
]


def test_intervals_in_epochs_and_grids_of_two_sides():
    assert config_lib.interval_steps(500, 0.0, 40) == 500
    assert config_lib.interval_steps(500, 2.0, 40) == 80
    assert config_lib.interval_steps(500, 0.5, 3) == 2
    assert config_lib.interval_steps(500, 0.01, 10) == 1
    assert config_lib.grid_shape("4x8") == (4, 8) and config_lib.grid_shape("5") == (5, 5)
    # Workdirs saved when the grid had one side still load.
    old = config_lib.to_json(tiny_config()).replace('"sample_grid": "4"', '"sample_grid": 6')
    assert '"sample_grid": 6' in old
    assert config_lib.from_json(old).sample_grid == "6"


@pytest.mark.parametrize("field,value,message", [
    ("lr_g", "fast", "config.train.lr_g='fast' should be of type float"),
    ("d_steps", 1.5, "config.train.d_steps=1.5 should be of type int"),
    ("lr_decay", 1, "config.train.lr_decay=1 should be of type bool"),
])
def test_wrong_types_in_a_replaced_section(field, value, message):
    # ConfigDict checks types on assignment, but a config file may replace a whole section.
    config = tiny_config()
    config.train = ml_collections.ConfigDict({**config.train.to_dict(), field: value})
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        config_lib.validate(config)


@pytest.mark.parametrize("overrides,message", BAD_VALUES)
def test_bad_values(overrides, message):
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.validate(tiny_config(**overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("overrides", [
    {"train__loss": "wgan", "train__gradient_penalty": "wgan_gp", "model__d_norm": "none",
     "train__augment": "cutout,color,translation"},
    {"train__loss": "wgan", "model__d_norm": "spectral"},
    {"train__loss": "lsgan", "train__label_smoothing": 0.1, "model__d_norm": "none"},
    {"train__loss": "hinge", "train__gradient_penalty": "r1", "model__d_norm": "spectral",
     "train__gp_weight": 0.1},
])
def test_objectives_that_make_sense_pass(overrides):
    config_lib.validate(tiny_config(**overrides))


def test_batch_must_divide_by_devices_and_processes():
    config = tiny_config(train__batch_size=18)
    config_lib.validate(config, device_count=2)
    with pytest.raises(config_lib.ConfigError,
                       match=r"config.train.batch_size=18 does not divide by the 4 devices"):
        config_lib.validate(config, device_count=4)
    with pytest.raises(config_lib.ConfigError, match="by the 4 processes"):
        config_lib.validate(config, device_count=2, process_count=4)


def test_unknown_and_missing_fields():
    config = tiny_config()
    config.train.lr_dd = 1e-3
    with pytest.raises(config_lib.ConfigError, match="config.train.lr_dd is not a known field"):
        config_lib.validate(config)
    config = tiny_config()
    del config.train["lr_d"]
    with pytest.raises(config_lib.ConfigError, match="config.train.lr_d is missing"):
        config_lib.validate(config)


def test_shipped_configs_are_valid():
    import importlib.util
    folder = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs")
    names = sorted(f for f in os.listdir(folder) if f.endswith(".py"))
    assert {"default.py", "mnist.py", "celeba64.py", "celeba128.py", "celeba64_msg.py",
            "celeba128_msg.py", "folder64.py"} <= set(names)
    for name in names:
        spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(folder, name))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config_lib.validate(module.get_config())


def test_json_round_trip():
    config = tiny_config(model__msg=True, train__lr_g=1e-3)
    restored = config_lib.from_json(config_lib.to_json(config))
    assert restored.to_dict() == config.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("flag,message", [
    ("--config.train.foo=1", "--config.train.foo is not a known config field"),
    ("--config.train.lr_d=abc", "--config.train.lr_d=abc: could not convert"),
    ("--config.model.resolution=100", "config.model.resolution=100 must be a power of two"),
    ("--config.train.batch_size=10", "config.train.batch_size=10 does not divide by the 4"),
])
def test_command_line_errors_are_one_line(tmp_path, flag, message):
    result = run(main_args(tmp_path) + [flag], devices=4, check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert message in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    result = run(["-m", "dcgan_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}"],
                 check=False)
    assert result.returncode != 0
    assert "cannot load --config=configs/nope.py: it does not exist" in result.stderr
    assert "Traceback" not in result.stderr
