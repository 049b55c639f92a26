"""Command line: `python -m dcgan_jax.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.train.lr_d=1e-4`. Running the same
command on the same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dcgan_jax import cli, parallel, workdir  # noqa: E402
from dcgan_jax import config as config_lib
from dcgan_jax.errors import UserFacingError  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Folder for checkpoints, samples and logs.")
config_flags.DEFINE_config_file("config", None, "Config file (configs/NAME.py).",
                                lock_config=True)
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 in a multi-host run (or JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run (or JAX_NUM_PROCESSES).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run "
                     "(or JAX_PROCESS_ID).")
flags.DEFINE_bool("start_over", False,
                  "Train afresh in a workdir that holds a run: its files are first moved into "
                  "DIR/previous/TIME/, never overwritten.")
flags.mark_flags_as_required(["config", "workdir"])


PROGRAM = "dcgan_jax"


def parse_flags(argv: list[str]) -> list[str]:
    return cli.parse_config_flags(PROGRAM, argv,
                                  set(config_lib.flatten(config_lib.get_default_config())))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    cli.set_up_process()
    cli.quiet_logs()
    try:
        parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                        FLAGS.process_id)
        config_lib.validate(FLAGS.config, jax.device_count(), jax.process_count())
        workdir.create(FLAGS.workdir)
        if jax.process_index() == 0:
            workdir.ensure_free(FLAGS.workdir)
    except (UserFacingError, ValueError) as error:  # ValueError: incomplete multi-host flags
        cli.fail(PROGRAM, str(error))
    # The input and logging stack loads only now: TensorFlow takes seconds to import.
    from dcgan_jax import train

    try:
        train.train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.start_over)
    except UserFacingError as error:
        cli.fail(PROGRAM, str(error))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
