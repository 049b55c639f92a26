"""The host processor as `dcgan_jax.host_cpu` reads it, and the forms it picks."""

from __future__ import annotations

from dcgan_jax import host_cpu

AVX512_HOST = """processor\t: 0
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512_bf16 amx_bf16
"""
AVX2_HOST = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma
"""


def test_flags_and_description_are_read_from_cpuinfo(tmp_path):
    avx512, avx2 = tmp_path / "avx512", tmp_path / "avx2"
    avx512.write_text(AVX512_HOST)
    avx2.write_text(AVX2_HOST)
    assert host_cpu.has_avx512(str(avx512)) and not host_cpu.has_avx512(str(avx2))
    assert "amx_bf16" in host_cpu.flags(str(avx512))
    description = host_cpu.description(str(avx512))
    assert description.startswith("Intel(R) Xeon(R) Processor, ")
    assert description.endswith("avx2 fma avx512f avx512_bf16 amx_bf16")
    assert host_cpu.description(str(avx2)).endswith("cores, avx2 fma")


def test_a_host_without_cpuinfo_takes_the_avx2_forms(tmp_path):
    missing = str(tmp_path / "no-such-file")
    assert host_cpu.flags(missing) == frozenset()
    assert not host_cpu.has_avx512(missing)
    assert host_cpu.description(missing).startswith("unknown CPU, ")


def test_l2_cache_is_read_from_sysfs_or_assumed(tmp_path):
    for index, (level, size) in enumerate([("1", "48K"), ("1", "32K"), ("2", "2048K"),
                                           ("3", "307200K")]):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        (folder / "level").write_text(level + "\n")
        (folder / "size").write_text(size + "\n")
    assert host_cpu.l2_cache_bytes(str(tmp_path)) == 2 * 1024 * 1024
    assert host_cpu.l2_cache_bytes(str(tmp_path / "missing")) == host_cpu.DEFAULT_L2_BYTES


def test_l2_cache_sizes_in_any_unit_and_unreadable_folders(tmp_path):
    """Sizes with K, M or no unit; an empty size file or a folder without a level is
    skipped, and with nothing readable the AVX2 host's cache is assumed."""
    def caches(name, *folders):
        root = tmp_path / name
        for index, files in enumerate(folders):
            folder = root / f"index{index}"
            folder.mkdir(parents=True)
            for file, text in files.items():
                (folder / file).write_text(text)
        return str(root)

    assert host_cpu.l2_cache_bytes(caches("m", {"level": "2", "size": "1M"})) == 1024**2
    assert host_cpu.l2_cache_bytes(caches("plain", {"level": "2", "size": "524288"})) == 524288
    assert host_cpu.l2_cache_bytes(caches("skip", {"size": "48K"}, {"level": "2", "size": "\n"},
                                          {"level": "2", "size": "1280K"})) == 1280 * 1024
    assert (host_cpu.l2_cache_bytes(caches("none", {"level": "2", "size": ""}))
            == host_cpu.DEFAULT_L2_BYTES)


def test_kernel_gradient_chunks_from_the_l2_cache_stay_within_the_measured_range():
    from dcgan_jax.strided_conv import kernel_grad_chunk_bytes
    kb, mb = 1024, 1024**2
    assert kernel_grad_chunk_bytes(512 * kb) == 2 * mb  # the AVX2 EPYC, as tuned
    assert kernel_grad_chunk_bytes(2 * mb) == 8 * mb  # the AVX-512 Xeon
    assert kernel_grad_chunk_bytes(1 * mb) == 4 * mb
    assert kernel_grad_chunk_bytes(256 * kb) == 2 * mb
    assert kernel_grad_chunk_bytes(64 * mb) == 8 * mb  # a cache shared by many cores


def test_forms_follow_the_processor_and_default_to_the_avx2_hosts():
    from dcgan_jax.strided_conv import CpuForms
    kb, mb = 1024, 1024**2
    assert CpuForms.for_processor(512 * kb, avx512=False) == CpuForms()  # the AVX2 EPYC
    xeon = CpuForms.for_processor(2 * mb, avx512=True)
    assert (xeon.kernel_grad_chunk_bytes, xeon.kernel_grad_wide_minor) == (8 * mb, True)
    assert CpuForms.of_host() == CpuForms.for_processor(host_cpu.l2_cache_bytes(),
                                                        host_cpu.has_avx512())
    assert hash(xeon) == hash(CpuForms.for_processor(2 * mb, avx512=True))  # a static arg


def test_one_process_keeps_its_own_forms():
    from dcgan_jax.strided_conv import CpuForms, agree_across_processes
    other = CpuForms(kernel_grad_chunk_bytes=16 * 1024, kernel_grad_wide_minor=True)
    assert agree_across_processes(other) == (other, None)
    assert agree_across_processes() == (CpuForms.of_host(), None)


def test_layers_compile_the_forms_they_are_given():
    """Patch products in chunks of one image are loops in the compiled layer; the host's
    forms take none at this width."""
    import jax
    import jax.numpy as jnp

    from dcgan_jax.strided_conv import CpuForms, DownsampleConv, UpsampleConv
    chunked = CpuForms(patches_min_channels=8, conv_chunk_bytes=1, kernel_grad_chunk_bytes=1)
    x = jnp.ones((4, 8, 8, 16))

    def loops(layer):
        params = layer.init(jax.random.PRNGKey(0), x)
        step = jax.jit(jax.grad(lambda p: layer.apply(p, x).sum()))
        return step.lower(params).compile().as_text().count(" while(")

    for layer in (DownsampleConv, UpsampleConv):
        assert loops(layer(16)) == 0
        assert loops(layer(16, forms=chunked)) > 0
