"""The host processor: its name and the vector extensions that decide which CPU forms of the
strided convolutions XLA runs fastest (`dcgan_jax.strided_conv`), and which the benchmarks
name beside every CPU figure.

Read from /proc/cpuinfo; where that file is missing (macOS, Windows) no extension is known,
and the forms tuned on AVX2 hosts are taken.
"""

from __future__ import annotations

import functools
import os

CPUINFO = "/proc/cpuinfo"

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
    return f"{model}, {len(os.sched_getaffinity(0))} cores, {' '.join(named) or 'no AVX2'}"
