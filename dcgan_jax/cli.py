"""What every command line shares: its process settings, one-line errors, config files that
fail to load, and quiet third-party logs.
"""

from __future__ import annotations

import logging as python_logging
import os
import runpy
import sys
from typing import Any, Callable, NoReturn

from absl import flags, logging


def set_up_process() -> None:
    """The process-wide settings of the command lines, in one place: importing dcgan_jax
    makes none. Each command line's main() calls this before any JAX computation (so do
    tests/conftest.py and the benchmarks).

    - JAX's classic threefry: the partitionable scheme, JAX's default, takes seconds per
      random op to compile on CPUs, and the classic one gives the same numbers on any device
      count too. The trainer's random streams (latents, labels, flips, augmentations), and so
      a resumed run's continuation and the tests' expected numbers, are those of this
      scheme. JAX reads the option when it traces, so arrays made before are unaffected.
    - TensorFlow (the backend of tfds and clu, imported later) without its start-up notices.
    """
    import jax
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    jax.config.update("jax_threefry_partitionable", False)


def fail(program: str, message: str) -> NoReturn:
    """Exits with status 1 after one line on stderr."""
    sys.exit(f"{program}: error: {message}")


def config_file_problem(filename: str) -> str | None:
    """Why a config file cannot give a config, in one line; None if it can."""
    if not os.path.isfile(filename):
        return f"cannot load --config={filename}: it does not exist"
    try:
        namespace = runpy.run_path(filename)
        if not callable(namespace.get("get_config")):
            return (f"--config={filename} defines no get_config(); a config file returns "
                    f"its config from get_config(), see configs/default.py")
        namespace["get_config"]()
    except Exception as error:  # the file's own code: any error is the file's
        text = error.msg if isinstance(error, SyntaxError) else str(error)
        return (f"cannot load --config={filename}{_line_in(error, filename)}: "
                f"{type(error).__name__}: {text.splitlines()[0] if text else ''}")
    return None


def _line_in(error: BaseException, filename: str) -> str:
    if isinstance(error, SyntaxError) and error.lineno:
        return f" (line {error.lineno})"
    tb = error.__traceback__
    line = None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(filename):
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" (line {line})" if line else ""


def parse_config_flags(program: str, argv: list[str], known_fields: set[str]) -> list[str]:
    """absl parsing of a command line with --config, with one line for a bad flag, a config
    file that does not load, or an unknown --config.FIELD."""
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.get("seed")  # a config that failed to load may raise only on use
        return rest
    except flags.Error as error:
        message = str(error).splitlines()[0]
    except Exception:  # the config file, or an override of a field it lacks
        message = None
    filename = _config_filename(argv)
    if filename and (problem := config_file_problem(filename)):
        fail(program, problem)
    if message is None:
        fields = [arg[2:].split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
        unknown = [f for f in fields if f.removeprefix("config.") not in known_fields]
        named = unknown or fields
        message = (f"--{named[0]} is not a known config field; see dcgan_jax/config.py"
                   if named else "the command line cannot be parsed; see --help")
    fail(program, message)


def _config_filename(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


class _DropLibraryRecords(python_logging.Filter):
    """Keeps orbax's own error reports, and asyncio's about its failed tasks, out of the
    output: the caller reports the failure in one line (checkpoints.CheckpointError)."""

    def filter(self, record: python_logging.LogRecord) -> bool:
        return "/orbax/" not in record.pathname and record.name != "asyncio"


def _quiet_unraisable(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """A hook that drops the pages of 'Exception ignored in <coroutine>' that orbax's
    asyncio leaves when a save or restore fails and the interpreter shuts down, and passes
    the rest to the `previous` hook."""
    def hook(unraisable: Any) -> None:
        text = f"{unraisable.exc_type.__name__}: {unraisable.exc_value}"
        if ("coroutine" in repr(unraisable.object) or "Event loop is closed" in text
                or "Python is likely shutting down" in text):
            return
        previous(unraisable)
    return hook


def quiet_logs() -> None:
    """Warnings of our own only: libraries log at INFO, and orbax reports failures we
    report ourselves."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
        logging.get_absl_handler().addFilter(_DropLibraryRecords())
    sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
