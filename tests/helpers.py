"""Subprocess runners for multi-device, multi-host and command-line tests."""

from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args: list[str], *, devices: int = 1, timeout: float = 300,
        check: bool = True, **popen_kwargs) -> subprocess.CompletedProcess:
    """Runs a Python command line with `devices` simulated CPU devices."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=timeout, **popen_kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def main_args(workdir, config_file: str = "tests/tiny_config.py", **overrides) -> list[str]:
    args = ["-m", "dcgan_jax.main", f"--config={config_file}", f"--workdir={workdir}"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    return args
