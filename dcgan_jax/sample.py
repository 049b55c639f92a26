"""Figures from a trained run, needing only its workdir (config.json and checkpoints).

  python -m dcgan_jax.sample MODE --workdir=RUN [--step=N] [--seed=S] [--out=PATH]

Modes:
  grid          a rows x cols PNG of samples
  files         --num individual PNG files in a folder (for FID tools)
  interpolate   linear and spherical paths through --points latents: a PNG each with one
                row per segment, key points in the first and last columns, and a GIF each
  gif           the run's samples/step_*.png as an animated GIF of training
  real_vs_fake  real training images beside samples (reads the dataset)
  plot          losses and D outputs over steps from metrics.jsonl
  fid           FID (and KID) over steps from the evaluations in metrics.jsonl (a run
                trained with --config.eval.every > 0)
  summary       parameter tables of G and D
The averaged (EMA) generator is used when the run has one, unless --no_ema is given.
GIFs narrower than 256 pixels are enlarged by a whole factor, nearest neighbour.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Callable

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax.sample")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import imageio.v3 as iio  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from dcgan_jax import checkpoints, images, parallel, paths, step as step_lib  # noqa: E402
from dcgan_jax import workdir as workdir_lib  # noqa: E402
from dcgan_jax.losses import D_OUTPUT_NAMES, PROBABILITY  # noqa: E402

MODES = ("grid", "files", "interpolate", "gif", "real_vs_fake", "plot", "fid", "summary")

flags.DEFINE_string("workdir", None, "The run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to restore; the latest by default.")
flags.DEFINE_integer("seed", 0, "Seed of the latents: the same seed gives the same images.")
flags.DEFINE_string("out", None, "Output file or folder; under WORKDIR/figures by default.")
flags.DEFINE_integer("rows", 8, "Grid rows.")
flags.DEFINE_integer("cols", 8, "Grid columns.")
flags.DEFINE_integer("num", 1000, "Images for `files`.")
flags.DEFINE_integer("batch_size", 256, "Images per generator call for `files`; rounded "
                     "up to a multiple of the device count.")
flags.DEFINE_integer("points", 4, "Latent points an interpolation passes through.")
flags.DEFINE_integer("frames", 8, "Steps from one interpolation point to the next: a PNG "
                     "row holds frames + 1 images.")
flags.DEFINE_float("fps", 8.0, "Frames per second of GIFs.")
flags.DEFINE_bool("no_ema", False, "Use G's raw weights even when the run averages them.")
FLAGS = flags.FLAGS
_latent_sequence = jax.jit(step_lib.latent_sequence, static_argnums=2)


class Sampler:
    """A restored generator that turns latents into uint8 images."""

    def __init__(self, workdir: str, step: int | None = None, use_ema: bool = True,
                 mesh: Mesh | None = None):
        self.workdir = workdir
        self.config = checkpoints.read_run_config(workdir)
        self.mesh = mesh or parallel.make_mesh()
        manager = checkpoints.make_manager(workdir, read_only=True)
        abstract = step_lib.abstract_train_state(self.config, self.mesh, total_steps=1)
        self.state = checkpoints.restore(manager, abstract, step)
        self.step = int(parallel.fetch(self.state.step))
        self.use_ema = use_ema and self.state.ema is not None
        self._generate = jax.jit(functools.partial(
            step_lib.generate_images, config=self.config, use_ema=self.use_ema))

    def latents(self, seed: int, count: int, offset: int = 0) -> np.ndarray:
        """Latents `offset` to `offset + count` of the sequence that `seed` defines: image i
        of a seed is the same whatever the batch it is generated in."""
        return np.asarray(_latent_sequence(seed, jnp.arange(offset, offset + count),
                                           self.config.model.nz))

    def generate(self, z: np.ndarray, sharded: bool = False) -> np.ndarray:
        """uint8 images of the latents; `sharded` splits the batch over all devices."""
        sharding = (parallel.batch_sharded(self.mesh) if sharded
                    else parallel.replicated(self.mesh))
        out = self._generate(self.state, jax.device_put(jnp.asarray(z), sharding))
        return images.to_uint8(np.asarray(jax.device_get(out)))


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """Spherical interpolation, falling back to linear for (anti)parallel vectors."""
    cos = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    omega = np.arccos(np.clip(cos, -1.0, 1.0))
    if np.sin(omega) < 1e-6:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def interpolation_path(points: np.ndarray, frames: int, method: str) -> np.ndarray:
    """Latents from points[0] to points[-1], `frames` per segment, both ends included."""
    mix: Callable[[np.ndarray, np.ndarray, float], np.ndarray] = (
        slerp if method == "slerp" else lambda a, b, t: (1 - t) * a + t * b)
    path = [mix(a, b, i / frames) for a, b in zip(points, points[1:]) for i in range(frames)]
    return np.stack(path + [points[-1]]).astype(np.float32)


def segment_rows(path_images: np.ndarray, frames: int) -> np.ndarray:
    """The images of a whole path regrouped as one row per segment, each from its start key
    point to its end key point, so a grid of them reads left to right row by row; the inner
    key points end one row and start the next."""
    return np.concatenate([path_images[i:i + frames + 1]
                           for i in range(0, len(path_images) - 1, frames)])


def output_path(workdir: str, default_name: str) -> str:
    """--out, or WORKDIR/figures/default_name; its folder is created."""
    path = FLAGS.out or os.path.join(workdir, workdir_lib.FIGURES_DIR, default_name)
    paths.make_dirs(os.path.dirname(paths.absolute(path)))
    return path


def make_grid_figure(sampler: Sampler, seed: int, rows: int, cols: int) -> np.ndarray:
    return images.make_grid(sampler.generate(sampler.latents(seed, rows * cols)), rows)


def write_files(sampler: Sampler, folder: str, num: int, seed: int, batch_size: int) -> None:
    from tqdm import tqdm
    devices = jax.device_count()
    batch_size = -(-batch_size // devices) * devices
    paths.make_dirs(folder)
    with tqdm(total=num, unit="img", desc=f"writing {folder}") as progress:
        for start in range(0, num, batch_size):
            count = min(batch_size, num - start)
            z = sampler.latents(seed, batch_size, offset=start)  # full batches: one compile
            for i, image in enumerate(sampler.generate(z, sharded=True)[:count]):
                images.save_png(os.path.join(folder, f"{start + i:06d}.png"), image)
            progress.update(count)


def write_interpolations(sampler: Sampler, seed: int, points: int, frames: int, fps: float,
                         prefix: str) -> list[str]:
    """Per method, a PNG of `points - 1` rows of `frames + 1` images and a GIF walking the
    whole path there and back; the paths of both methods pass through the same key points."""
    ends = sampler.latents(seed, points)
    written = []
    for method in ("linear", "slerp"):
        walk = sampler.generate(interpolation_path(ends, frames, method))
        images.save_png(f"{prefix}_{method}.png",
                        images.make_grid(segment_rows(walk, frames), points - 1))
        ping_pong = list(walk) + list(walk[-2:0:-1])  # loops without repeated frames
        images.save_gif(f"{prefix}_{method}.gif", ping_pong, fps)
        written += [f"{prefix}_{method}.png", f"{prefix}_{method}.gif"]
    return written


def write_training_gif(workdir: str, path: str, fps: float, ema: bool) -> int:
    """The run's sample grids as a GIF: the EMA ones when asked for and present."""
    grids = paths.glob(os.path.join(workdir, workdir_lib.SAMPLES_DIR), "step_*.png")
    averaged = [p for p in grids if p.endswith("_ema.png")]
    frames = averaged if ema and averaged else [p for p in grids if p not in averaged]
    if not frames:
        raise checkpoints.CheckpointError(
            f"no sample grids in {os.path.join(workdir, 'samples')}; train first")
    images.save_gif(path, [iio.imread(paths.read_bytes(p)) for p in frames], fps)
    return len(frames)


def write_real_vs_fake(sampler: Sampler, path: str, seed: int, side: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dcgan_jax import data
    config = sampler.config
    source = data.open_source(config.dataset, config.data.cache_dir, config.data.tfds_data_dir)
    real = images.make_grid(data.sample_images(config, source, side * side), side)
    fake = make_grid_figure(sampler, seed, side, side)
    figure, axes = plt.subplots(1, 2, figsize=(12, 6.4))
    for ax, grid, title in ((axes[0], real, "Real images"),
                            (axes[1], fake, f"Generated, step {sampler.step}")):
        ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)


def _json_line(line: str) -> object:
    """A line of metrics.jsonl; None for one that a crash left half-written."""
    try:
        return json.loads(line)
    except ValueError:
        return None


def read_metrics(workdir: str, key: str, absent: str = "") -> list[dict]:
    """The rows of metrics.jsonl that hold `key`: loss_d for training, fid for evaluations;
    `absent` tells what to do when there are none."""
    path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    if not paths.is_file(path):
        raise checkpoints.CheckpointError(f"{path} does not exist; train first")
    rows = [row for line in paths.read_text(path).splitlines()
            if isinstance(row := _json_line(line), dict) and key in row]
    if not rows:
        raise checkpoints.CheckpointError(f"{path} holds no {key} values{absent}")
    return rows


def write_plot(workdir: str, path: str) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(workdir, "loss_d")
    steps = [r["step"] for r in rows]
    figure, (losses, outputs) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    losses.plot(steps, [r["loss_d"] for r in rows], label="loss D")
    losses.plot(steps, [r["loss_g"] for r in rows], label="loss G")
    losses.set_ylabel("loss")
    # Runs logged before d_output was written were all of the probability kind.
    kind = rows[-1].get("d_output", PROBABILITY)
    d = D_OUTPUT_NAMES[kind]
    outputs.plot(steps, [r["d_real"] for r in rows], label=f"{d}(x)")
    outputs.plot(steps, [r["d_fake_before"] for r in rows], label=f"{d}(G(z)) before D update")
    outputs.plot(steps, [r["d_fake_after"] for r in rows], label=f"{d}(G(z)) after D update")
    outputs.set_ylabel(f"D output ({kind})")
    outputs.set_xlabel("step")
    for ax in (losses, outputs):
        ax.legend()
        ax.grid(alpha=0.3)
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)
    return len(rows)


def write_fid_plot(workdir: str, path: str) -> tuple[int, dict]:
    """FID over steps, and KID beside it when computed; returns the count and best row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_metrics(workdir, "fid", absent=(
        ": the run was trained without evaluations. Train with --config.eval.every=N (N > 0; "
        "the FID weights are fetched once, or given by --config.eval.fid_weights=PATH), or "
        f"score a checkpoint with python -m dcgan_jax.evaluate --workdir={workdir}"))
    steps = [r["step"] for r in rows]
    best = min(rows, key=lambda r: r["fid"])
    has_kid = all("kid" in r for r in rows)
    figure, axes = plt.subplots(1, 2 if has_kid else 1, figsize=(12 if has_kid else 7, 4.5),
                                squeeze=False)
    fid_ax = axes[0, 0]
    fid_ax.plot(steps, [r["fid"] for r in rows], marker="o")
    fid_ax.scatter([best["step"]], [best["fid"]], s=120, facecolors="none", edgecolors="red",
                   label=f"best: {best['fid']:.2f} at step {best['step']}")
    fid_ax.set_ylabel("FID (lower is better)")
    fid_ax.legend()
    if has_kid:
        kid_ax = axes[0, 1]
        kid_ax.errorbar(steps, [r["kid"] for r in rows], yerr=[r["kid_std"] for r in rows],
                        marker="o", capsize=3)
        kid_ax.set_ylabel("KID (mean ± std over subsets)")
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    images.save_figure(figure, path, dpi=100)
    plt.close(figure)
    return len(rows), best


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in MODES:
        sys.exit(f"dcgan_jax.sample: error: give one mode of {', '.join(MODES)} "
                 f"(got {' '.join(argv[1:]) or 'none'})")
    if not FLAGS.workdir:
        sys.exit("dcgan_jax.sample: error: --workdir is required")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    for name in ("rows", "cols", "num", "batch_size", "frames"):
        if FLAGS[name].value < 1:
            sys.exit(f"dcgan_jax.sample: error: --{name}={FLAGS[name].value} must be at least 1")
    if FLAGS.points < 2:
        sys.exit(f"dcgan_jax.sample: error: --points={FLAGS.points} must be at least 2")
    mode, workdir = argv[1], FLAGS.workdir
    ema = not FLAGS.no_ema
    try:
        if mode == "gif":
            path = output_path(workdir, "training.gif")
            print(f"{path}: {write_training_gif(workdir, path, FLAGS.fps, ema)} frames")
            return
        if mode == "plot":
            path = output_path(workdir, "losses.png")
            print(f"{path}: {write_plot(workdir, path)} logged steps")
            return
        if mode == "fid":
            path = output_path(workdir, "fid.png")
            count, best = write_fid_plot(workdir, path)
            print(f"{path}: {count} evaluations; best FID {best['fid']:.3f} at step "
                  f"{best['step']}")
            return
        sampler = Sampler(workdir, FLAGS.step, ema)
    except checkpoints.CheckpointError as error:
        sys.exit(f"dcgan_jax.sample: error: {error}")
    tag = f"step{sampler.step}{'_ema' if sampler.use_ema else ''}_seed{FLAGS.seed}"
    if mode == "summary":
        from dcgan_jax import reporting
        print(f"{workdir}, step {sampler.step}",
              reporting.parameter_table("Generator", sampler.state.g.params),
              reporting.parameter_table("Discriminator", sampler.state.d.params), sep="\n")
    elif mode == "files":
        folder = FLAGS.out or os.path.join(workdir, workdir_lib.FIGURES_DIR, f"files_{tag}")
        write_files(sampler, folder, FLAGS.num, FLAGS.seed, FLAGS.batch_size)
        print(f"{folder}: {FLAGS.num} images")
    elif mode == "grid":
        path = output_path(workdir, f"grid_{tag}.png")
        images.save_png(path, make_grid_figure(sampler, FLAGS.seed, FLAGS.rows, FLAGS.cols))
        print(path)
    elif mode == "interpolate":
        prefix = output_path(workdir, f"interpolate_{tag}")
        prefix = prefix[:-4] if prefix.endswith((".png", ".gif")) else prefix
        print("\n".join(write_interpolations(sampler, FLAGS.seed, FLAGS.points, FLAGS.frames,
                                             FLAGS.fps, prefix)))
    elif mode == "real_vs_fake":
        from dcgan_jax import data
        path = output_path(workdir, f"real_vs_fake_{tag}.png")
        try:
            write_real_vs_fake(sampler, path, FLAGS.seed, FLAGS.rows)
        except data.DataError as error:
            sys.exit(f"dcgan_jax.sample: error: {error}")
        print(path)


if __name__ == "__main__":
    app.run(main)
