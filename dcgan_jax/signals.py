"""Ctrl-C and SIGTERM: one line and status 128 + signal, at any moment of a command.

Two phases. From its first line until training starts, a command line exits at the signal
(`exit_on_stop_signals`), through SystemExit so that `finally` blocks still clean up (a
preparation's partial folder, grain's workers). The training loop then takes the signals
over (`stop_requests`) to save a checkpoint first. Only the standard library is imported:
the command lines install the first handler before their heavy imports.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _exit_now(signum: int) -> None:
    """Ends the process at once: a SystemExit raised inside a callback (the garbage
    collector's, a __del__) is printed and ignored, and the process would go on."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + signum)


def exit_on_stop_signals(program: str) -> None:
    """SIGINT and SIGTERM stop `program` with one line on stderr and status 128 + signal
    (130 or 143); a second signal while it unwinds exits at once."""
    stopping = threading.Event()
    received: list[int] = []

    def handler(signum: int, frame: object) -> None:
        del frame
        if stopping.is_set():
            _exit_now(signum)
        stopping.set()
        received.append(signum)
        print(f"{program}: stopped by {signal.Signals(signum).name} (exit status "
              f"{128 + signum}); files already saved are kept", file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    def unraisable(report: object) -> None:
        """A handler that ran inside a callback (the garbage collector's, a __del__) had
        its SystemExit printed and ignored: exit here instead."""
        if stopping.is_set() and getattr(report, "exc_type", None) is SystemExit:
            _exit_now(int(report.exc_value.code) - 128)
        previous_hook(report)

    def skip_finalization() -> None:
        """Registered first, so run last of the exit functions (after grain's workers are
        stopped): tearing down the interpreter while XLA's threads still run can crash."""
        if received:
            _exit_now(received[0])

    if threading.current_thread() is threading.main_thread():
        atexit.register(skip_finalization)
        previous_hook = sys.unraisablehook
        sys.unraisablehook = unraisable
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)


def stop_requests() -> threading.Event:
    """An event set by the first SIGTERM or SIGINT, so a loop can save before it exits; a
    second signal exits at once, with one line and status 128 + signal."""
    requested = threading.Event()

    def handler(signum: int, frame: object) -> None:
        del frame
        name = signal.Signals(signum).name
        if requested.is_set():
            signal.signal(signum, signal.SIG_DFL)
            print(f"Received {name} while stopping: stopping now without saving (exit "
                  f"status {128 + signum}); the checkpoints saved before are kept.",
                  flush=True)
            _exit_now(signum)
        print(f"Received {name}: saving a checkpoint, then stopping "
              f"(send it again to stop without saving).", flush=True)
        requested.set()

    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, handler)
    return requested


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Holds SIGINT and SIGTERM back while the block runs (in the main thread), so that
    what it does (moving a run's files) is done whole; they arrive when it ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def ignore_interrupts_in_worker(worker_index: int = 0, worker_count: int = 0) -> None:
    """A decoding worker's first act (grain's worker_init_fn): Ctrl-C reaches every process
    of the terminal's group, and the parent alone decides how to stop. The parent may
    have started it with the stop signals blocked; a SIGTERM that came meanwhile ends it now."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
