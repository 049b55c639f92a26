"""A trained generator as files that run without dcgan_jax (see `dcgan_jax.exporters`).

  python -m dcgan_jax.export --workdir=RUN [--step=N] [--no_ema] \\
      [--formats=stablehlo,onnx,savedmodel,safetensors] [--out=DIR]

The folder gets each format's file, check.npz and generator.json. The onnx format needs
`pip install 'dcgan_jax[export]'` (onnx, onnxruntime, safetensors); TensorFlow, which the
savedmodel format needs, is part of the plain install.
"""

from __future__ import annotations

import os

if __name__ == "__main__":  # Before the imports below: Ctrl-C during them is one line too.
    from dcgan_jax import signals
    signals.exit_on_stop_signals("dcgan_jax.export")

from absl import app, flags, logging  # noqa: E402

from dcgan_jax import cli, paths  # noqa: E402
from dcgan_jax import workdir as workdir_lib  # noqa: E402
from dcgan_jax.errors import UserFacingError  # noqa: E402
from dcgan_jax.names import EXPORT_FORMATS  # noqa: E402

flags.DEFINE_string("workdir", None, "The run's workdir.")
flags.DEFINE_integer("step", None, "Checkpoint step to export; the latest by default.")
flags.DEFINE_bool("no_ema", False, "Export G's raw weights even when the run averages them.")
flags.DEFINE_list("formats", list(EXPORT_FORMATS), f"Some of {','.join(EXPORT_FORMATS)}.")
flags.DEFINE_string("out", None, "Folder of the export (new, empty, or an earlier export, "
                    "which is replaced whole); WORKDIR/export/stepN[_ema] by default.")
FLAGS = flags.FLAGS
PROGRAM = "dcgan_jax.export"


def default_out(workdir: str, step: int, ema: bool) -> str:
    return os.path.join(workdir, workdir_lib.EXPORT_DIR, f"step{step}{'_ema' if ema else ''}")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(PROGRAM, f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.workdir:
        cli.fail(PROGRAM, "--workdir is required")
    cli.set_up_process()
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax warns about read-only managers
    from dcgan_jax import exporters
    try:
        exporters.check_formats(FLAGS.formats)
        if FLAGS.out:
            exporters.check_output_folder(FLAGS.out)
        elif paths.is_remote(FLAGS.workdir):
            raise exporters.ExportError(f"--workdir={FLAGS.workdir} is in a bucket: give a "
                                        f"local --out=DIR for the export")
        generator, state = exporters.restore_generator(FLAGS.workdir, FLAGS.step,
                                                       not FLAGS.no_ema)
        out = FLAGS.out or default_out(FLAGS.workdir, generator.step, generator.use_ema)
        print(f"exporting G of {FLAGS.workdir} at step {generator.step} "
              f"({'averaged' if generator.use_ema else 'raw'} weights) to {out}", flush=True)
        exporters.export(generator, state, FLAGS.formats, out,
                         say=lambda line: print(line, flush=True))
    except UserFacingError as error:
        cli.fail(PROGRAM, str(error))
    print(os.path.join(out, exporters.MANIFEST))


if __name__ == "__main__":
    app.run(main)
