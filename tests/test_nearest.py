"""`sample nearest`, the memorisation figure, on checkpoints made directly (no training) and
random Inception weights: a generator that copies training images finds them at distance 0
in both spaces, a conditional run's rows are class-balanced, and bad flags are one line."""

import re

import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from dcgan_jax import checkpoints, data, parallel, sample
from dcgan_jax import config as config_lib
from dcgan_jax import step as step_lib

from helpers import random_fid_weights
from tiny_config import tiny_config

ROW = re.compile(r"row (\d+)(?: \(class (\w+)\))?: Inception (\S+) \(#(\d+)\), "
                 r"pixels (\S+) \(#(\d+)\)")


def save_run(workdir, config):
    """A workdir holding `config` and its initial state."""
    state = step_lib.create_train_state(config, parallel.make_mesh(), total_steps=1)
    (workdir / "config.json").write_text(config_lib.to_json(config))
    manager = checkpoints.make_manager(str(workdir))
    checkpoints.save(manager, int(state.step), state, dataset={"dataset": config.dataset})
    checkpoints.finish_saves(manager)


def make_run(tmp_path_factory, weights, **overrides):
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(eval__fid_weights=weights, eval__allow_unknown_weights=True,
                         eval__dims=64, eval__batch_size=16, **overrides)
    save_run(workdir, config)
    return workdir, config


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    return random_fid_weights(str(tmp_path_factory.mktemp("weights") / "weights.npz"))


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory, fid_weights):
    return make_run(tmp_path_factory, fid_weights)


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, fid_weights):
    return make_run(tmp_path_factory, fid_weights, model__num_classes=10,
                    model__g_cond="cbn")


def run_sample(mode, capsys, **flag_values):
    with flagsaver.flagsaver(**flag_values):
        sample.main(["dcgan_jax.sample", mode])
    return capsys.readouterr().out


def training_images(config, count):
    """The first `count` training images in evaluation order, as uint8."""
    source = data.open_source(config.dataset, config.data.cache_dir)
    return next(data.evaluation_batches(config, source, count, count))["image"]


@pytest.mark.slow  # the Inception over the dataset and the samples
def test_copies_are_their_own_nearest(unconditional, tmp_path, capsys, monkeypatch):
    workdir, config = unconditional
    rows, k, pool = 4, 2, 40
    copies = training_images(config, rows)
    monkeypatch.setattr(sample.Sampler, "generate",
                        lambda self, z, sharded=False, labels=None: copies[:len(z)])

    found = sample.nearest_training_images(sample.Sampler(str(workdir)), seed=0, rows=rows,
                                           k=k, pool=pool)
    assert found["pool"] == pool and found["classes"] is None
    np.testing.assert_array_equal(found["generated"], copies)
    for space in ("inception", "pixels"):
        near = found[space]
        assert near["indices"].shape == near["distances"].shape == (rows, k)
        np.testing.assert_array_equal(near["indices"][:, 0], np.arange(rows))
        np.testing.assert_array_equal(near["images"][:, 0], copies)
        assert (np.diff(near["distances"], axis=1) >= 0).all()
        assert (near["distances"][:, 0] < 1e-3 * near["distances"][:, 1]).all()
    np.testing.assert_array_equal(found["pixels"]["distances"][:, 0], 0)  # exact copies

    out = tmp_path / "nearest.png"
    printed = run_sample("nearest", capsys, workdir=str(workdir), rows=rows, cols=k, num=pool,
                         out=str(out)).splitlines()
    assert printed[0] == str(out)
    assert printed[1].startswith(f"nearest of the first {pool} training images of demo:mnist")
    assert len(printed) == 2 + rows
    for row, line in enumerate(printed[2:]):
        match = ROW.fullmatch(line)
        assert match, line
        assert int(match[1]) == row and match[2] is None
        assert int(match[4]) == int(match[6]) == row
        assert float(match[3]) < 1e-3 and float(match[5]) == 0
    figure = Image.open(out)
    assert figure.format == "PNG" and figure.width > figure.height  # 1 + 2k columns


def test_conditional_rows_are_class_balanced(conditional, tmp_path, capsys):
    workdir, _ = conditional
    printed = run_sample("nearest", capsys, workdir=str(workdir), seed=3, rows=3, cols=2,
                         num=20, truncation=0.7, out=None).splitlines()
    assert printed[0] == str(workdir / "figures" / "nearest_step0_seed3_trunc0.7.png")
    assert Image.open(printed[0]).format == "PNG"
    matches = [ROW.fullmatch(line) for line in printed[2:]]
    assert all(matches) and len(matches) == 3, printed
    assert [m[2] for m in matches] == ["0", "1", "2"]
    assert all(0 <= int(m[4]) < 20 and 0 <= int(m[6]) < 20 for m in matches)


def test_bad_flags_are_one_line(unconditional, capsys):
    workdir, _ = unconditional

    def error(**flag_values):
        with pytest.raises(SystemExit) as exit_info:
            run_sample("nearest", capsys, workdir=str(workdir), **flag_values)
        message = str(exit_info.value.code)
        assert "\n" not in message and message.startswith("dcgan_jax.sample: error: ")
        return message.removeprefix("dcgan_jax.sample: error: ")

    assert error(num=3) == ("--num=3 training images cannot give --cols=4 nearest ones; give "
                            "--num=4 or more (0 searches them all)")
    assert error(num=-1) == "--num=-1 must be at least 0"
    assert error(cols=0) == "--cols=0 must be at least 1"
    assert error(truncation=0.0) == "--truncation=0 must be above 0"
    assert error(**{"class": 1}) == (
        "--class applies to grid, files, interpolate and real_vs_fake, not nearest")
