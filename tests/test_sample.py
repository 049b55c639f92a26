"""dcgan_jax.sample on a tiny trained run: every figure, determinism, --step, errors."""

import os
import re
import shutil

import imageio.v3 as iio
import jax
import numpy as np
import pytest
from absl.testing import flagsaver
from PIL import Image

from dcgan_jax import checkpoints, parallel
from dcgan_jax import sample as sample_lib
from dcgan_jax import step as step_lib
from dcgan_jax.sample import Sampler, interpolation_path

from helpers import main_args, run

pytestmark = pytest.mark.slow  # every test reads a run the command line trains (workdir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("trained")
    run(main_args(path, **{"train.num_steps": 4, "train.ema_decay": 0.5, "ckpt_every": 2,
                           "sample_every": 2, "log_every": 1}))
    return path


def sample(workdir, *args, devices=1, check=True):
    return run(["-m", "dcgan_jax.sample", *args, f"--workdir={workdir}"], devices=devices,
               check=check)


def sample_in_process(workdir, mode, capsys, **flag_values):
    """The command line's main, in this process: its printed lines."""
    with flagsaver.flagsaver(workdir=str(workdir), **flag_values):
        sample_lib.main(["dcgan_jax.sample", mode])
    return capsys.readouterr().out.splitlines()


def test_grid_is_reproducible_on_any_device_count(workdir, tmp_path):
    paths = {}
    for devices in (1, 4):
        paths[devices] = tmp_path / f"grid{devices}.png"
        sample(workdir, "grid", "--seed=3", "--rows=3", "--cols=5", f"--out={paths[devices]}",
               devices=devices)
    assert paths[1].read_bytes() == paths[4].read_bytes()
    grid = np.asarray(Image.open(paths[1]))
    assert grid.shape == (3 * 34 + 2, 5 * 34 + 2) and grid.std() > 0
    other = tmp_path / "other.png"
    sample(workdir, "grid", "--seed=4", "--rows=3", "--cols=5", f"--out={other}")
    assert other.read_bytes() != paths[1].read_bytes()


def test_files_interpolate_and_summary(workdir, tmp_path):
    folder = tmp_path / "files"
    sample(workdir, "files", "--num=10", "--batch_size=4", "--seed=3", f"--out={folder}",
           devices=2)
    names = sorted(os.listdir(folder))
    assert names == [f"{i:06d}.png" for i in range(10)]
    first = np.asarray(Image.open(folder / names[0]))
    assert first.shape == (32, 32) and first.dtype == np.uint8
    # Image i of a seed does not depend on the batch it was generated in.
    grid = tmp_path / "grid.png"
    sample(workdir, "grid", "--seed=3", "--rows=1", "--cols=2", f"--out={grid}")
    from_grid = np.asarray(Image.open(grid))[2:34, 36:68].astype(int)
    assert np.abs(from_grid - np.asarray(Image.open(folder / names[1])).astype(int)).max() <= 1

    out = sample(workdir, "interpolate", "--points=3", "--frames=4",
                 f"--out={tmp_path / 'walk'}").stdout.split()
    assert sorted(out) == sorted(str(tmp_path / f"walk_{m}.{e}") for m in ("linear", "slerp")
                                 for e in ("png", "gif"))
    gif = iio.imread(tmp_path / "walk_linear.gif", mode="L")
    assert gif.shape == (16, 256, 256)  # there and back, 32 pixels enlarged 8 times

    summary = sample(workdir, "summary").stdout
    assert re.search(r"Generator: [\d,]+ parameters", summary)
    assert re.search(r"Discriminator: [\d,]+ parameters", summary)


def test_training_gif_plot_and_real_vs_fake(workdir, tmp_path):
    out = sample(workdir, "gif", f"--out={tmp_path / 'train.gif'}").stdout
    assert "2 frames" in out
    frames = iio.imread(tmp_path / "train.gif", mode="L")
    last_grid = np.asarray(Image.open(workdir / "samples" / "step_0000004_ema.png"))
    assert last_grid.shape == (4 * 34 + 2,) * 2
    assert frames.shape == (2, 276, 276)  # grids under 256 pixels wide enlarged twice
    np.testing.assert_array_equal(frames[1], last_grid.repeat(2, 0).repeat(2, 1))
    raw = sample(workdir, "gif", "--no_ema", f"--out={tmp_path / 'raw.gif'}").stdout
    assert "2 frames" in raw

    assert "4 logged steps" in sample(workdir, "plot", f"--out={tmp_path / 'p.png'}").stdout
    assert Image.open(tmp_path / "p.png").size == (1000, 700)

    sample(workdir, "real_vs_fake", "--rows=4", f"--out={tmp_path / 'rvf.png'}")
    figure = np.asarray(Image.open(tmp_path / "rvf.png").convert("L"))
    assert figure.shape == (640, 1200) and figure.std() > 0


def test_interpolation_ends_are_the_end_samples(workdir):
    sampler = Sampler(str(workdir))
    ends = sampler.latents(seed=7, count=3)

    def generate(z):  # float outputs: a 4-step generator varies by less than a grey level
        return np.asarray(step_lib.generate_images(sampler.state, z, sampler.config))

    direct = generate(ends)
    for method in ("linear", "slerp"):
        path = interpolation_path(ends, 5, method)
        assert path.shape == (11, ends.shape[1])
        np.testing.assert_allclose(path[[0, 5, 10]], ends, rtol=1e-6, atol=1e-6)
        walk = generate(path)
        np.testing.assert_allclose(walk[[0, 5, 10]], direct, rtol=1e-4, atol=1e-5)
        assert np.abs(walk[2] - direct[0]).max() > 1e-4  # the way between differs
    assert np.array_equal(sampler.generate(path[[0]])[0], sampler.generate(ends)[0])


def test_interpolate_rows_run_from_key_point_to_key_point(workdir, tmp_path):
    points, frames, side = 4, 3, 34  # side: 32 pixels and the grid's 2-pixel padding
    sample(workdir, "interpolate", "--seed=5", f"--points={points}", f"--frames={frames}",
           f"--out={tmp_path / 'walk'}")
    sampler = Sampler(str(workdir))
    ends = sampler.latents(seed=5, count=points)
    for method in ("linear", "slerp"):
        figure = np.asarray(Image.open(tmp_path / f"walk_{method}.png"))
        assert figure.shape == ((points - 1) * side + 2, (frames + 1) * side + 2)

        def tile(row, col, figure=figure):
            return figure[2 + row * side:row * side + side, 2 + col * side:col * side + side]

        walk = sampler.generate(interpolation_path(ends, frames, method))  # as the command
        keys = walk[::frames, ..., 0]
        assert np.abs(keys.astype(int) - sampler.generate(ends)[..., 0]).max() <= 1
        for row in range(points - 1):
            np.testing.assert_array_equal(tile(row, 0), keys[row])
            np.testing.assert_array_equal(tile(row, frames), keys[row + 1])
            np.testing.assert_array_equal(tile(row, 1), walk[row * frames + 1, ..., 0])

        gif = iio.imread(tmp_path / f"walk_{method}.gif", mode="L")
        assert gif.shape == (2 * len(walk) - 2, 256, 256)
        np.testing.assert_array_equal(gif[0], keys[0].repeat(8, 0).repeat(8, 1))


def test_fid_without_evaluations_says_how_to_get_them(workdir, tmp_path):
    out = tmp_path / "fid.png"
    result = sample(workdir, "fid", f"--out={out}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "dcgan_jax.sample" in line]
    assert len(message) == 1 and "holds no evaluations" in message[0]
    assert "--config.eval.every=N" in message[0] and "dcgan_jax.evaluate" in message[0]
    assert not out.exists()


def test_step_restores_that_steps_weights(workdir):
    config = checkpoints.read_run_config(str(workdir))
    mesh = parallel.make_mesh()
    manager = checkpoints.make_manager(str(workdir), read_only=True)
    saved = checkpoints.restore(manager, step_lib.abstract_train_state(config, mesh, 1), 2)
    at_two, latest = Sampler(str(workdir), step=2), Sampler(str(workdir))
    assert at_two.step == 2 and latest.step == 4
    for a, b in zip(jax.tree.leaves(at_two.state.ema), jax.tree.leaves(saved.ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    z = latest.latents(0, 4)
    assert not np.array_equal(at_two.generate(z), latest.generate(z))
    raw = Sampler(str(workdir), use_ema=False)
    assert not raw.use_ema and not np.array_equal(raw.generate(z), latest.generate(z))


def test_errors(workdir, tmp_path):
    missing = sample(workdir, "grid", "--step=3", check=False)
    assert missing.returncode != 0
    assert missing.stderr.strip().splitlines()[-1].endswith("saved steps: 2, 4")

    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(workdir / "config.json", empty / "config.json")
    none = sample(empty, "grid", check=False)
    assert "no checkpoint in" in none.stderr.strip().splitlines()[-1]

    not_a_run = sample(tmp_path / "nowhere", "grid", check=False)
    assert "config.json does not exist" in not_a_run.stderr.strip().splitlines()[-1]

    broken = tmp_path / "broken"
    shutil.copytree(workdir, broken)
    for root, _, files in os.walk(broken / "checkpoints" / "4" / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    unreadable = sample(broken, "grid", check=False)
    last = unreadable.stderr.strip().splitlines()[-1]
    assert unreadable.returncode != 0 and "cannot be read" in last, unreadable.stderr[-2000:]
    assert "Traceback" not in unreadable.stderr

    bad_points = sample(workdir, "interpolate", "--points=1", check=False)
    assert bad_points.stderr.strip().splitlines()[-1].endswith("--points=1 must be at least 2")

    bad_mode = sample(workdir, "paint", check=False)
    assert "give one mode of grid, files" in bad_mode.stderr.strip().splitlines()[-1]


def test_truncated_latents_keep_the_entries_within_the_truncation(workdir):
    sampler = Sampler(str(workdir))
    untruncated = sampler.latents(seed=3, count=20)
    today = step_lib.latent_sequence(3, np.arange(20), sampler.config.model.nz)
    np.testing.assert_array_equal(untruncated, np.asarray(today))  # no truncation: as before
    for truncation in (0.5, 1.0):
        z = sampler.latents(3, 20, truncation=truncation)
        assert z.shape == untruncated.shape and np.abs(z).max() <= truncation
        kept = np.abs(untruncated) <= truncation
        assert 0 < kept.mean() < 1
        np.testing.assert_array_equal(z[kept], untruncated[kept])
        # Latent i is a function of (seed, i) alone, whatever the batch and offset.
        np.testing.assert_array_equal(sampler.latents(3, 5, offset=5, truncation=truncation),
                                      z[5:10])


def test_truncation_figure_has_a_column_per_truncation(workdir, tmp_path, capsys):
    out, side, rows = tmp_path / "truncation.png", 34, 2  # side: 32 pixels and the padding
    printed = sample_in_process(workdir, "truncation", capsys, seed=5, rows=rows, out=str(out))
    values = sample_lib.DEFAULT_TRUNCATIONS
    assert printed == [str(out), "column 0: untruncated"] + [
        f"column {k}: truncation {value:g}" for k, value in enumerate(values, 1)]
    figure = np.asarray(Image.open(out))
    assert figure.shape == (rows * side + 2, (1 + len(values)) * side + 2)
    sampler = Sampler(str(workdir))
    for col, truncation in ((0, None), (4, values[3])):
        column = sampler.generate(sampler.latents(5, rows, truncation=truncation))[..., 0]
        for row in range(rows):
            np.testing.assert_array_equal(
                figure[2 + row * side:row * side + side, 2 + col * side:col * side + side],
                column[row])

    printed = sample_in_process(workdir, "grid", capsys, seed=5, rows=1, cols=2, out=None,
                                truncation=0.7)
    assert printed == [str(workdir / "figures" / "grid_step4_ema_seed5_trunc0.7.png")]


def test_truncation_flag_errors_are_one_line(workdir, capsys):
    def error(mode, **flag_values):
        with pytest.raises(SystemExit) as exit_info:
            sample_in_process(workdir, mode, capsys, **flag_values)
        message = str(exit_info.value.code)
        assert "\n" not in message and message.startswith("dcgan_jax.sample: error: ")
        return message.removeprefix("dcgan_jax.sample: error: ")

    assert error("grid", truncation=-1.0) == "--truncation=-1 must be above 0"
    assert error("files", truncation=float("nan")) == "--truncation=nan must be above 0"
    assert error("plot", truncation=0.5) == (
        "--truncation applies to grid, files, interpolate, classes, real_vs_fake and nearest, "
        "not plot")
    assert error("truncation", truncation=0.5).endswith(
        "not truncation; its values are --truncations")
    assert error("truncation", truncations=["1", "0"]) == (
        "--truncations=1,0 must be numbers above 0 separated by commas, e.g. "
        "--truncations=1,0.5")
    assert error("grid", truncations=["1"]) == "--truncations applies to truncation, not grid"
