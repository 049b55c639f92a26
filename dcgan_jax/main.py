"""Command line: `python -m dcgan_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.train.lr_d=1e-4`. Running the same
command on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcgan_jax import config as config_lib, parallel  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, samples and logs.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 in a multi-host run (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run "
                     "(or JAX_PROCESS_ID).")
flags.mark_flags_as_required(["config", "workdir"])


def fail(message: str) -> None:
    sys.exit(f"dcgan_jax: error: {message}")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, with a one-line error for a bad flag, field or config file."""
    try:
        rest = FLAGS(argv)
    except flags.Error as error:
        fail(str(error).splitlines()[0])
    except (AttributeError, KeyError):
        fields = [arg[2:].split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
        known = set(config_lib.flatten(config_lib.get_default_config()))
        unknown = [f for f in fields if f.removeprefix("config.") not in known]
        fail(f"--{unknown[0] if unknown else fields[0]} is not a known config field; "
             f"see dcgan_jax/config.py")
    try:
        FLAGS.config.get("seed")  # A config that failed to load raises only on use.
    except (OSError, SyntaxError, ImportError) as error:
        filename = config_flags.get_config_filename(FLAGS["config"])
        reason = "it does not exist" if not os.path.isfile(filename) else str(error).splitlines()[0]
        fail(f"cannot load --config={filename}: {reason}")
    return rest


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax and clu log every save at INFO.
    try:
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        config_lib.validate(FLAGS.config, jax.device_count(), jax.process_count())
    except ValueError as error:  # ConfigError, or incomplete multi-host flags
        fail(str(error))
    # The input and logging stack loads only now: TensorFlow takes seconds to import.
    from dcgan_jax import checkpoints, data, reporting, train
    from dcgan_jax.evaluation import metrics, weights

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (config_lib.ConfigError, data.DataError, checkpoints.CheckpointError,
            reporting.NonFiniteLossError, weights.WeightsError, metrics.MetricError) as error:
        fail(str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
