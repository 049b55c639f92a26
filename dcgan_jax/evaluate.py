"""FID and KID on demand, with pytorch-fid's InceptionV3 on the accelerator.

  python -m dcgan_jax.evaluate --workdir=RUN [--step=N] [--num_samples=10000] [--no_ema]
      a checkpoint's generator against its dataset (reference statistics cached); a
      class-conditional generator's samples are class-balanced;
  python -m dcgan_jax.evaluate --workdir=RUN --per_class [--metrics=fid,kid,pr]
      each class of a class-conditional run scored alone: its samples (--num_samples split
      evenly) against its dataset images, by every metric, a line per class, then the means
      over the classes (intra-class FID's among them);
  python -m dcgan_jax.evaluate --workdir=gs://BUCKET/RUN --coordinator_address=HOST0:PORT \\
      --num_processes=N --process_id=I
      on every host of a pod, with dcgan_jax.main's multi-host flags (or their JAX_*
      variables, or a detected SLURM, MPI or TPU cluster): each host computes its share of
      the samples' and the dataset's features, and process 0 alone prints;
  python -m dcgan_jax.evaluate --real=DIR|STATS.npz --fake=DIR|STATS.npz
      two folders of images (or statistics files: pytorch-fid's --save-stats or ours);
  python -m dcgan_jax.evaluate --real=DIR --save_stats=OUT.npz
      writes a folder's statistics, which pytorch-fid reads too.

--fid_weights=PATH reads pytorch-fid's pt_inception-2015-12-05-6726825d.pth, checked by its
SHA-256; any other file (a .npz conversion too) needs --allow_unknown_weights, and its FID is
not comparable with published ones. Without --fid_weights the weights are fetched from GitHub
once into the cache, checked and converted.

Flags, the workdir and the weights file are checked before JAX's model stack and TensorFlow
are imported (seconds), so that a mistake fails at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import TYPE_CHECKING

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax.evaluate")

from absl import app, flags, logging  # noqa: E402

from dcgan_jax import cli, paths  # noqa: E402
from dcgan_jax import workdir as workdir_lib  # noqa: E402
from dcgan_jax.errors import UserFacingError  # noqa: E402
from dcgan_jax.evaluation import weights  # noqa: E402

if TYPE_CHECKING:
    import numpy as np

    from dcgan_jax.evaluation import features, metrics

flags.DEFINE_string("workdir", None, "A run's workdir: evaluate its generator.")
flags.DEFINE_integer("step", None, "Checkpoint step; the latest by default.")
flags.DEFINE_bool("no_ema", False, "Use G's raw weights even when the run averages them.")
flags.DEFINE_integer("num_samples", None, "Generated images; the run's config.eval value "
                     "by default.")
flags.DEFINE_integer("num_reference", None, "Dataset images of the reference statistics "
                     "(0: all); the run's config.eval value by default.")
flags.DEFINE_bool("per_class", False, "With --workdir of a class-conditional run: every "
                  "metric (--metrics or the run's config.eval.metrics) of each class's samples "
                  "against that class's dataset images, and their means over the classes "
                  "(FID's is intra-class FID).")
flags.DEFINE_string("real", None, "Folder of real images, or a statistics .npz.")
flags.DEFINE_string("fake", None, "Folder of generated images, or a statistics .npz.")
flags.DEFINE_string("save_stats", None, "With --real only: write its statistics here.")
flags.DEFINE_string("fid_weights", None, "pytorch-fid's weights file (.pth); the run's "
                    "config.eval value by default.")
flags.DEFINE_bool("allow_unknown_weights", None, "Accept a --fid_weights file that is not "
                  "pytorch-fid's (FID then not comparable with published values); the run's "
                  "config.eval value by default.")
flags.DEFINE_integer("dims", None, "Feature dimensions: 64, 192, 768 or 2048 (default).")
flags.DEFINE_integer("batch_size", None, "Images per Inception call (default 200).")
flags.DEFINE_list("metrics", None, "Some of fid,kid,is,pr,dc,mem (is: the Inception Score, "
                  "pr: precision and recall, dc: density and coverage, mem: the memorisation "
                  "check); the run's config.eval.metrics, or fid,kid for folders, by default.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 in a multi-host run (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run "
                     "(or JAX_PROCESS_ID).")
flags.DEFINE_string("cache_dir", "", "Cache of the fetched weights for --real/--fake; "
                    "~/.cache/dcgan_jax by default (a run uses its config.data.cache_dir).")
FLAGS = flags.FLAGS


def _override(value, default):
    return default if value is None else value


def _folder_statistics(path: str, extractor: features.FeatureExtractor | None
                       ) -> tuple[metrics.Statistics, np.ndarray | None]:
    """A folder's statistics with all its features (and its logits, when the extractor gives
    them), or a statistics file's."""
    from dcgan_jax.evaluation import features, metrics
    if path.endswith(".npz"):
        if not paths.is_file(path):
            raise metrics.MetricError(f"statistics file {path} does not exist")
        return metrics.Statistics.load(path), None
    found = extractor.of_batches(features.folder_images(path, extractor.batch_size))
    pool = extractor.pool(found)
    return metrics.Statistics.of(pool, keep_features=len(pool)), extractor.logits(found)


def _needs_network(real: str, fake: str | None) -> bool:
    return not (real.endswith(".npz") and fake and fake.endswith(".npz"))


def _wanted(default: str) -> tuple[str, ...]:
    from dcgan_jax import config as config_lib
    return config_lib.eval_metrics(",".join(FLAGS.metrics) if FLAGS.metrics else default)


def evaluate_folders(real: str, fake: str | None, save_stats: str | None) -> None:
    from dcgan_jax import data, parallel
    from dcgan_jax.evaluation import features, metrics
    dims = _override(FLAGS.dims, 2048)
    wanted = _wanted("fid,kid")
    extractor = None
    if _needs_network(real, fake):
        path = weights.locate(FLAGS.fid_weights or "",
                              os.path.join(data.cache_root(FLAGS.cache_dir), "weights"),
                              bool(FLAGS.allow_unknown_weights))
        extractor = features.FeatureExtractor(path, dims, parallel.make_mesh(),
                                              _override(FLAGS.batch_size, 200),
                                              logits="is" in wanted and not save_stats)
    real_stats, _ = _folder_statistics(real, extractor)
    if save_stats:
        import jax
        if jax.process_index() == 0:  # every process of a pod holds the same statistics
            real_stats.save(save_stats)
        print(f"{save_stats}: statistics of {real_stats.count:,} images ({dims}-d)")
        return
    fake_stats, fake_logits = _folder_statistics(fake, extractor)
    if fake_stats.features is None or real_stats.features is None:
        # Statistics files of pytorch-fid keep no features: FID alone can be computed.
        if FLAGS.metrics and wanted != ("fid",):
            raise metrics.MetricError(
                f"{fake if fake_stats.features is None else real} keeps no features: only "
                f"fid can be computed from it (--metrics=fid)")
        values = {"fid": metrics.fid(real_stats, fake_stats)}
    else:
        values = metrics.score(wanted, fake_stats.features, real_stats, fake_logits)
    counts = [len(s.features) for s in (real_stats, fake_stats) if s.features is not None]
    print_scores(values, metrics.KID_SUBSETS, min([metrics.KID_SUBSET_SIZE, *counts]))


def print_scores(values: dict[str, float], kid_subsets: int, kid_subset_size: int) -> None:
    """A line per value: `FID: ...`, `KID: ... ± ...`, `IS: ... ± ...`, `precision: ...`..."""
    from dcgan_jax.evaluation import quality
    lines = {
        "fid": lambda: f"FID: {values['fid']:.6f}",
        "kid": lambda: (f"KID: {values['kid']:.6f} ± {values['kid_std']:.6f} "
                        f"({kid_subsets} subsets of {kid_subset_size})"),
        "is": lambda: (f"IS: {values['is']:.6f} ± {values['is_std']:.6f} "
                       f"({quality.ISC_SPLITS} splits)"),
        "memorisation": lambda: (
            f"memorisation: {values['memorisation']:.6f} (the fraction of samples nearer a "
            f"dataset image than 1% of the dataset's images are to their nearest other; "
            f"about 0.01 without copying)"),
    }
    for name in ("fid", "kid", "is", "precision", "recall", "density", "coverage",
                 "memorisation"):
        if name in values:
            print(lines[name]() if name in lines else f"{name}: {values[name]:.6f}")


def evaluate_run(workdir: str, per_class: bool = False) -> None:
    """Scores a checkpoint of `workdir` by the metrics wanted: over class-balanced samples,
    or with `per_class` class by class."""
    from dcgan_jax import checkpoints, data, parallel
    from dcgan_jax import config as config_lib
    from dcgan_jax import step as step_lib
    from dcgan_jax.evaluation.evaluator import Evaluator, IntraClassEvaluator, per_class_lines
    from dcgan_jax.reporting import hide_gpus_from_tensorflow
    hide_gpus_from_tensorflow()
    config = checkpoints.read_run_config(workdir)
    e = config.eval
    e.num_samples = _override(FLAGS.num_samples, e.num_samples)
    e.num_reference = _override(FLAGS.num_reference, e.num_reference)
    e.dims = _override(FLAGS.dims, e.dims)
    e.batch_size = _override(FLAGS.batch_size, e.batch_size)
    e.fid_weights = _override(FLAGS.fid_weights, e.fid_weights)
    e.allow_unknown_weights = _override(FLAGS.allow_unknown_weights, e.allow_unknown_weights)
    e.metrics = ",".join(_wanted(e.metrics))
    config_lib.check_metrics(e.metrics, e.dims, "--metrics" if FLAGS.metrics else
                             "config.eval.metrics")
    mesh = parallel.make_mesh()
    abstract = step_lib.abstract_train_state(config, mesh, total_steps=1)
    state = checkpoints.restore(checkpoints.make_manager(workdir, read_only=True), abstract,
                                FLAGS.step)
    source = data.open_source(config.dataset, config.data.cache_dir, config.data.tfds_data_dir,
                              config.data.label_key)
    evaluator = (IntraClassEvaluator if per_class else Evaluator)(config, mesh, source)
    print(evaluator.reference_line)
    start = time.perf_counter()
    use_ema = not FLAGS.no_ema
    scores = evaluator(state, use_ema)
    print(f"{workdir}, step {int(parallel.fetch(state.step))}: "
          f"{evaluator.describe(state, use_ema)} in {time.perf_counter() - start:.1f} s")
    if per_class:
        print("\n".join(per_class_lines(evaluator.class_names, scores, e.kid_subsets,
                                         evaluator.kid_subset_sizes)))
        return
    print_scores(scores, e.kid_subsets,
                 min(e.kid_subset_size, e.num_samples, len(evaluator.reference.features)))


def _check_flags() -> str | None:
    """The first problem with the flags, or None."""
    if FLAGS.workdir and (FLAGS.real or FLAGS.fake):
        return "give --workdir, or --real and --fake, not both"
    if not FLAGS.workdir and not FLAGS.real:
        return "give --workdir=RUN, or --real=DIR and --fake=DIR (see --help)"
    if FLAGS.real and not (FLAGS.fake or FLAGS.save_stats):
        return "--real needs --fake=DIR to compare with, or --save_stats=OUT.npz"
    if FLAGS.per_class and not FLAGS.workdir:
        return "--per_class scores a class-conditional run: give --workdir=RUN"
    if FLAGS.save_stats and FLAGS.fake:
        return "--save_stats writes the statistics of --real alone; drop --fake"
    if FLAGS.allow_unknown_weights and not (FLAGS.fid_weights or FLAGS.workdir):
        return ("--allow_unknown_weights applies to --fid_weights=PATH only: fetched weights "
                "are always pytorch-fid's")
    if FLAGS.dims is not None:
        from dcgan_jax.evaluation.inception import BLOCK_BY_DIMS
        if FLAGS.dims not in BLOCK_BY_DIMS:
            return f"--dims={FLAGS.dims} must be one of {tuple(BLOCK_BY_DIMS)}"
    if FLAGS.metrics is not None:
        from dcgan_jax import config as config_lib
        try:
            config_lib.check_metrics(",".join(FLAGS.metrics), _override(FLAGS.dims, 2048),
                                     "--metrics")
        except config_lib.ConfigError as error:
            return str(error)
        if FLAGS.save_stats:
            return "--save_stats writes statistics, not metrics; drop --metrics"
        if "is" in FLAGS.metrics and FLAGS.fake and FLAGS.fake.endswith(".npz"):
            return (f"--metrics=is needs the logits of images: give --fake a folder of "
                    f"images, not the statistics file {FLAGS.fake}")
    for name in ("num_samples", "batch_size"):
        if FLAGS[name].value is not None and FLAGS[name].value < (2 if name[0] == "n" else 1):
            return f"--{name}={FLAGS[name].value} is too small"
    if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
        return f"--num_processes={FLAGS.num_processes} must be at least 1"
    if FLAGS.process_id is not None and FLAGS.process_id < 0:
        return f"--process_id={FLAGS.process_id} must be at least 0"
    if FLAGS.process_id is not None and FLAGS.num_processes is not None and (
            FLAGS.process_id >= FLAGS.num_processes):
        return (f"--process_id={FLAGS.process_id} must be below "
                f"--num_processes={FLAGS.num_processes}")
    return None


def _check_inputs() -> str | None:
    """The first problem with the workdir or the weights file, or None: found before the
    heavy imports."""
    path, allow = FLAGS.fid_weights, FLAGS.allow_unknown_weights
    if FLAGS.workdir:
        config_path = os.path.join(FLAGS.workdir, workdir_lib.CONFIG_FILE)
        if not paths.is_file(config_path):
            return f"{config_path} does not exist; is {FLAGS.workdir!r} a dcgan_jax workdir?"
        try:
            saved = json.loads(paths.read_text(config_path))
            path = _override(path, saved["eval"].get("fid_weights", ""))
            allow = _override(allow, saved["eval"].get("allow_unknown_weights", False))
            classes = saved.get("model", {}).get("num_classes", 0)
        except (OSError, ValueError, LookupError, TypeError, AttributeError):
            return None  # reading the run's config reports it
        if FLAGS.per_class and not classes:
            return (f"--per_class needs a class-conditional run, and {FLAGS.workdir}'s model "
                    f"is unconditional (config.model.num_classes=0); drop --per_class")
    elif not _needs_network(FLAGS.real, FLAGS.fake):
        return None
    try:
        if path:
            weights.check(path, bool(allow))
    except weights.WeightsError as error:
        return str(error)
    return None


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(f"dcgan_jax.evaluate: error: unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    if problem := _check_flags() or _check_inputs():
        sys.exit(f"dcgan_jax.evaluate: error: {problem}")
    cli.set_up_process()
    import jax

    from dcgan_jax import parallel
    try:  # every host of a pod computes its share; process 0 alone prints the results
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
    except ValueError as error:  # incomplete multi-host flags
        sys.exit(f"dcgan_jax.evaluate: error: {error}")
    with (open(os.devnull, "w") as devnull,
          contextlib.redirect_stdout(sys.stdout if jax.process_index() == 0 else devnull)):
        try:
            if FLAGS.workdir:
                evaluate_run(FLAGS.workdir, FLAGS.per_class)
            else:
                evaluate_folders(FLAGS.real, FLAGS.fake, FLAGS.save_stats)
        except UserFacingError as error:  # each process exits with it, as dcgan_jax.main's
            sys.exit(f"dcgan_jax.evaluate: error: {error}")


if __name__ == "__main__":
    app.run(main)
