"""The host processor: its name and the vector extensions that decide which CPU forms of the
strided convolutions XLA runs fastest (`dcgan_jax.strided_conv`), and which the benchmarks
name beside every CPU figure.

Read from /proc/cpuinfo and /sys/devices/system/cpu; where those are missing (macOS,
Windows) no extension is known, the cache is taken to be that of the AVX2 host the forms were
first tuned on, and its forms are taken.
"""

from __future__ import annotations

import functools
import os

CPUINFO = "/proc/cpuinfo"
CACHES = "/sys/devices/system/cpu/cpu0/cache"

# The L2 cache per core of that AVX2 host (AMD EPYC, Zen 2 and 3), assumed where none is read.
DEFAULT_L2_BYTES = 512 * 1024
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}

# The extensions that change which CPU kernels are fast, in the order benchmarks print them.
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "amx_bf16")


@functools.cache
def _cpuinfo(path: str) -> tuple[str, frozenset[str]]:
    model, flags = "unknown CPU", frozenset()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


def flags(path: str = CPUINFO) -> frozenset[str]:
    """The feature flags of the first processor listed (empty when unknown)."""
    return _cpuinfo(path)[1]


def has_avx512(path: str = CPUINFO) -> bool:
    """Whether the host has AVX-512 (avx512f), whose kernels in XLA favour other forms."""
    return "avx512f" in flags(path)


def description(path: str = CPUINFO) -> str:
    """Model name, the cores this process may use, and the vector flags in VECTOR_FLAGS."""
    model, present = _cpuinfo(path)
    named = [flag for flag in VECTOR_FLAGS if flag in present]
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count())
    return f"{model}, {cores} cores, {' '.join(named) or 'no AVX2'}"


@functools.cache
def l2_cache_bytes(path: str = CACHES) -> int:
    """The first core's L2 cache in bytes as sysfs gives it ("2048K", "1M", "524288"), or
    DEFAULT_L2_BYTES when no cache folder says level 2 with a readable size."""
    try:
        indices = sorted(name for name in os.listdir(path) if name.startswith("index"))
    except OSError:
        return DEFAULT_L2_BYTES
    for index in indices:
        folder = os.path.join(path, index)
        try:
            with open(os.path.join(folder, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(folder, "size")) as f:
                size = f.read().strip().upper()
            unit = _UNITS.get(size[-1:], 1)
            return int(size[:-1] if size[-1:] in _UNITS else size) * unit
        except (OSError, ValueError):
            continue
    return DEFAULT_L2_BYTES
