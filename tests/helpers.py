"""Subprocess runners for multi-device, multi-host and command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shared by the test processes, so a config compiled once loads from disk afterwards.
COMPILATION_CACHE = os.path.join(tempfile.gettempdir(), "dcgan_jax_test_xla_cache")


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """The environment of a test subprocess with `devices` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run(args: list[str], *, devices: int = 1, timeout: float = 300,
        check: bool = True) -> subprocess.CompletedProcess:
    """Runs a Python command line in the repository root and captures its output."""
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=subprocess_env(devices),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def main_args(workdir, config_file: str = "tests/tiny_config.py", **overrides) -> list[str]:
    args = ["-m", "dcgan_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args
