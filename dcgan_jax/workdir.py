"""A run's folder: its layout, its creation, and the lock that keeps one run in it at a time.

    DIR/config.json          the resolved config
    DIR/metrics.jsonl        one JSON object per logged step and per evaluation
    DIR/samples/             grids of G every sample_every steps, and real.png
    DIR/figures/             what `dcgan_jax.sample` writes by default
    DIR/checkpoints/STEP/    orbax checkpoints
    DIR/checkpoints_unreadable/STEP-TIME/   checkpoints that could not be read, moved aside
    DIR/previous/TIME/       an earlier run's files, set aside by a fresh start in DIR
    DIR/run.lock             held by the run training in DIR (not in a bucket)

DIR may be a bucket (gs://BUCKET/RUN), which every host of a pod reaches. Only the
standard library and etils.epath are imported here, so the command lines can check a
workdir before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Iterator

from dcgan_jax import paths
from dcgan_jax.errors import UserFacingError

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
FIGURES_DIR = "figures"
EXPORT_DIR = "export"
CHECKPOINTS_DIR = "checkpoints"
UNREADABLE_DIR = "checkpoints_unreadable"
PREVIOUS_DIR = "previous"
LOCK_FILE = "run.lock"


class WorkdirError(UserFacingError, ValueError):
    """The workdir cannot be used: not a folder, not writable, or in use."""


def create(workdir: str) -> str:
    """Creates the workdir if needed and checks that this user can write it; returns its
    absolute path (a bucket URL as given)."""
    if paths.is_remote(workdir):
        return _check_bucket(workdir)
    path = paths.absolute(workdir)
    try:
        os.makedirs(path, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WorkdirError(f"--workdir={workdir} is a file, or inside one, not a folder; "
                           f"choose another path") from None
    except OSError as error:
        raise WorkdirError(f"--workdir={workdir} cannot be created: "
                           f"{error.strerror or error}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir={workdir} cannot be written by this user; choose "
                           f"another folder or change its permissions")
    return path


def _check_bucket(workdir: str) -> str:
    """A bucket has no folders to create or permissions to read ahead: check that the
    bucket can be reached and that the workdir is not an object."""
    path = paths.absolute(workdir)
    scheme, _, rest = path.partition("://")
    bucket = f"{scheme}://{rest.split('/')[0]}"
    try:
        reachable = paths.exists(bucket)
        is_object = reachable and paths.is_file(path)
    except Exception as error:  # each file system backend raises its own types
        raise WorkdirError(f"--workdir={workdir} cannot be reached: "
                           f"{(str(error).strip().splitlines() or [repr(error)])[0]}") from None
    if not reachable:
        raise WorkdirError(f"--workdir={workdir}: bucket {bucket} does not exist or cannot be "
                           f"read with this machine's credentials")
    if is_object:
        raise WorkdirError(f"--workdir={workdir} is an object, not a folder; choose another "
                           f"path")
    return path


@contextlib.contextmanager
def locked(workdir: str, take: bool = True) -> Iterator[None]:
    """Holds an exclusive lock on DIR/run.lock while the block runs (when `take`).

    The lock is the kernel's (flock), so a killed run leaves no stale lock: the file stays,
    with the last holder's host and pid, but blocks no one. A second run fails at once,
    naming the holder. On several hosts, process 0 alone takes it for the whole run.
    A bucket has no such locks: in a bucket workdir nothing is taken, and one line says so.
    """
    if not take:
        yield
        return
    if paths.is_remote(workdir):
        print(f"Note: {workdir} is in a bucket, which has no locks: nothing stops another "
              f"run from using it at the same time", flush=True)
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise WorkdirError(f"--workdir={workdir} cannot be written: "
                           f"{error.strerror or error}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise WorkdirError(f"--workdir={workdir} is in use by another run "
                               f"({_holder(fd)}); wait for it to finish or stop it, or "
                               f"choose another workdir") from None
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def ensure_free(workdir: str) -> None:
    """Raises WorkdirError at once if a run holds the workdir (before a slow start-up)."""
    if not paths.is_remote(workdir):
        with locked(workdir):
            pass


# What a run writes in its workdir besides the folders named above.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SAMPLES_DIR, FIGURES_DIR, EXPORT_DIR,
             CHECKPOINTS_DIR, UNREADABLE_DIR)
EVENTS_PREFIX = "events.out.tfevents."


def run_files(workdir: str) -> list[str]:
    """Names of what runs wrote in the workdir, and nothing else that lies there (a workdir
    may be a folder that holds other things too)."""
    if not paths.exists(workdir):
        return []
    return [name for name in paths.list_names(workdir)
            if name in RUN_FILES or name.startswith(EVENTS_PREFIX)]


def set_aside(workdir: str) -> str | None:
    """Moves the files of the runs in the workdir into DIR/previous/TIME/, so that a fresh
    start overwrites nothing; returns that folder, or None if there was nothing to move."""
    names = run_files(workdir)
    if not names:
        return None
    aside = os.path.join(workdir, PREVIOUS_DIR,
                         datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    while paths.exists(aside):
        aside += "+"
    for name in names:
        paths.move(os.path.join(workdir, name), os.path.join(aside, name))
    return aside


def _holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"process {holder['pid']} on host {holder['host']}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "its host and pid are not recorded"
