"""PyTorch's stride-2 Conv2d and ConvTranspose2d (k=4, p=1) on NHWC, with their own gradients.

`downsample_conv` and `upsample_conv` are `jax.custom_vjp` functions whose forward pass and
gradients each pick a form per backend through `jax.lax.platform_dependent`: the backend's
own convolution on GPUs and TPUs, space-to-depth for inputs of few channels, and
patch-matrix products in batch chunks where XLA's CPU backend runs them faster. On CPUs the
chunk sizes and the kernel gradient's orientation follow the host processor
(`dcgan_jax.host_cpu`: its L2 cache, AVX-512 or not; process 0's in a multi-host run, see
`agree_across_processes`). Those choices are a value, `CpuForms`, that the layers take as a
field (None: this host's, read when first traced, never at import). Every form computes the
same convolution; the measurements behind each choice are in benchmarks/NOTES.md ("Where each
form is chosen"), and `benchmarks/layer_forms.py` times them all on a new host.
`DownsampleConv` and `UpsampleConv` are the layers of the networks in `dcgan_jax.models`.

Kernels are HWIO, as `nn.Conv` has them. Heights and widths must be even, as they are in both
networks, so that each form's adjoint maps back onto the input's shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from dcgan_jax import host_cpu

Initializer = Callable[..., jax.Array]
Form = Callable[[jax.Array, jax.Array], jax.Array]

_NHWC = ("NHWC", "HWIO", "NHWC")

# Inputs of fewer channels than this (images) take the space-to-depth forms on every backend.
FEW_CHANNELS = 8


def kernel_grad_chunk_bytes(l2_bytes: int) -> int:
    """Four times a core's L2 cache, within the 2 to 8 MB measured best (a size sysfs gives
    for a cache shared by several cores stays within it too)."""
    return min(max(4 * l2_bytes, 2 * 1024 * 1024), 8 * 1024 * 1024)


@dataclasses.dataclass(frozen=True)
class CpuForms:
    """Which forms XLA's CPU backend runs, and their batch chunks.

    kernel_grad_chunk_bytes: each batch chunk of a kernel gradient takes at most this many
        bytes of patches per device (or the gradient's size if larger): four times the
        core's L2 cache, within the 2 to 8 MB measured best (2 MB on the AVX2 EPYC with
        512 KB of L2, where they were tuned; 8 MB on a 2 MB-L2 AVX-512 Xeon, where the
        largest 128x128 layers ran 1.14 to 1.19 times faster than with 2 MB).
    kernel_grad_wide_minor: kernel gradients summed as [out, 16C] products (the wider side
        minor) where 16C exceeds the output channels and the gradient fits in a chunk: on an
        AVX-512 Xeon, XLA's kernels ran those layers 1.2 to 1.45 times faster than as
        [16C, out], and the one measured layer whose gradient exceeds a chunk (512 -> 1024
        channels at 8x8) slower. AVX2 hosts, where the forms were tuned, keep [16C, out].
    conv_chunk_bytes: the same bound for the patch-matrix convolutions (at least one image a
        chunk), so that their patches stay in cache.
    patches_min_channels: stride-2 convolutions of at least this many input channels are
        patch-matrix products. With 64 channels the direct form made the whole train step
        faster.
    patches_transpose_max_pixels: transposed convolutions from at most this many pixels
        (4x4: D's last block's input gradient, G's first upsampling) are one matrix product
        and its scatter.

    The defaults are the forms of that AVX2 host. A frozen dataclass, so that it hashes: the
    custom-VJP functions take it as a static argument.
    """

    kernel_grad_chunk_bytes: int = 2 * 1024 * 1024
    kernel_grad_wide_minor: bool = False
    conv_chunk_bytes: int = 8 * 1024 * 1024
    patches_min_channels: int = 128
    patches_transpose_max_pixels: int = 16

    @classmethod
    def for_processor(cls, l2_cache_bytes: int, avx512: bool) -> CpuForms:
        """The forms that suit a processor with this L2 cache per core, AVX-512 or not."""
        return cls(kernel_grad_chunk_bytes=kernel_grad_chunk_bytes(l2_cache_bytes),
                   kernel_grad_wide_minor=avx512)

    @staticmethod
    @functools.cache
    def of_host() -> CpuForms:
        """The forms that suit this host's processor: read when first asked for (never at
        import, so that importing the models reads nothing of the host), then cached."""
        return CpuForms.for_processor(host_cpu.l2_cache_bytes(), host_cpu.has_avx512())

    def describe(self) -> str:
        """The host-dependent choices in words, for a log line."""
        return (f"kernel-gradient chunks of {self.kernel_grad_chunk_bytes:,} bytes, "
                f"{'[out, 16C]' if self.kernel_grad_wide_minor else '[16C, out]'} sums")


def agree_across_processes(ours: CpuForms | None = None) -> tuple[CpuForms, str | None]:
    """The CPU forms every process of a run compiles, process 0's, given this process's
    (None: this host's); and what that changes here, in a line, if anything.

    The kernel gradients' batch chunks and orientation follow each host's processor, and
    they decide how many collectives the compiled step holds: processes on different
    processors would compile steps whose collectives do not match, and gloo would abort the
    run ("collective mismatch"). GPUs and TPUs compile only their own forms. Every process
    must call it (a broadcast) once it has joined the run.
    """
    ours = CpuForms.of_host() if ours is None else ours
    if jax.process_count() == 1 or jax.default_backend() != "cpu":
        return ours, None
    chunk, wide = multihost_utils.broadcast_one_to_all(
        np.array((ours.kernel_grad_chunk_bytes, ours.kernel_grad_wide_minor), np.int32))
    agreed = dataclasses.replace(ours, kernel_grad_chunk_bytes=int(chunk),
                                 kernel_grad_wide_minor=bool(wide))
    if agreed == ours:
        return agreed, None
    return agreed, (f"process {jax.process_index()} runs process 0's CPU forms "
                    f"({agreed.describe()}) rather than its own ({ours.describe()}): every "
                    f"process must compile the same step")


def direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The strided convolution as the backend's own `conv_general_dilated`."""
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=_NHWC)


def space_to_depth_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The strided convolution as a stride-1 2x2 convolution over 2x2 blocks of the padded
    input.

    Output pixel i reads padded rows 2i..2i+3, which are blocks i and i+1, so folding each
    2x2 block into 4C channels (and the kernel likewise) gives the same products, in
    another order. The 4C channels are zero-padded to a multiple of 8: cuDNN has no fast
    kernels for 3-channel convolutions or their adjoints.
    """
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    hb, wb = h // 2 + 1, w // 2 + 1
    blocks = padded.reshape(b, hb, 2, wb, 2, c).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(b, hb, wb, 4 * c)
    folded = kernel.reshape(2, 2, 2, 2, c, -1).transpose(0, 2, 1, 3, 4, 5)
    folded = folded.reshape(2, 2, 4 * c, -1)
    extra = -4 * c % 8
    blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, 0), (0, extra)))
    folded = jnp.pad(folded, ((0, 0), (0, 0), (0, extra), (0, 0)))
    return jax.lax.conv_general_dilated(blocks, folded, (1, 1), "VALID",
                                        dimension_numbers=_NHWC)


def conv_by_patches(x: jax.Array, kernel: jax.Array,
                    forms: CpuForms = CpuForms()) -> jax.Array:
    """The strided convolution as patches of x times the kernel, in a loop over chunks of the
    batch (`forms.conv_chunk_bytes`), accumulated in float32 or wider."""
    b, height, width, c = x.shape
    h, w = height // 2, width // 2
    chunks = _batch_chunks(b, h * w * 16 * c * x.dtype.itemsize, forms.conv_chunk_bytes)
    xs = x.reshape(b // chunks, chunks, height, width, c)

    def convolve_chunk(k, ys):
        x_k = jax.lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(ys, _patch_product(x_k, kernel), k, axis=1)

    ys = jax.lax.fori_loop(0, chunks, convolve_chunk,
                           jnp.zeros((b // chunks, chunks, h, w, kernel.shape[-1]), x.dtype))
    return ys.reshape(b, h, w, kernel.shape[-1])


def conv_transpose_input_dilated(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of `direct_conv(., kernel)` as flax's nn.ConvTranspose has it: the
    backend's own transposed convolution."""
    return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=_NHWC, transpose_kernel=True)


def conv_transpose_by_space_to_depth(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of `space_to_depth_conv(., kernel)`: a stride-1 convolution."""
    b, h, w, _ = x.shape
    primal = jax.ShapeDtypeStruct((b, 2 * h, 2 * w, kernel.shape[2]), x.dtype)
    return jax.linear_transpose(lambda u: space_to_depth_conv(u, kernel), primal)(x)[0]


def conv_transpose_by_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of the patch product: x times the kernel's transpose, each row added back
    onto the 16 input pixels its patch came from (`_patches_adjoint`), all in float32 or
    wider."""
    accumulator = _accumulator(x.dtype)
    rows = jnp.einsum("bhwo,ko->bhwk", x, kernel.reshape(-1, kernel.shape[-1]),
                      preferred_element_type=accumulator)
    return _patches_adjoint(rows, kernel.shape[2]).astype(x.dtype)


def kernel_grad_by_convolution(x: jax.Array, grad_y: jax.Array,
                               kernel: jax.Array) -> jax.Array:
    """The kernel gradient of the strided convolution as autodiff of the form GPUs and TPUs
    run takes it."""
    return jax.vjp(lambda k: _accelerator_form(kernel)(x, k), kernel)[1](grad_y)[0]


def kernel_grad_by_matmuls(x: jax.Array, grad_y: jax.Array, kernel: jax.Array,
                           wide_minor: bool | None = None,
                           forms: CpuForms = CpuForms()) -> jax.Array:
    """The kernel gradient of the strided convolution as patches of x times the output's
    gradient, summed over chunks of the batch in a loop.

    A chunk's patches take at most `forms.kernel_grad_chunk_bytes` per device, or the size
    of the kernel gradient if that is larger: adding each chunk's product to a gradient
    larger than the chunk costs more than the cache saves. `wide_minor` keeps the sum as
    [out, 16C], transposed once at the end, rather than [16C, out]; by default it follows
    `forms.kernel_grad_wide_minor` where 16C is the wider side and the gradient fits in a
    chunk.
    """
    b, _, _, c = x.shape
    h, w = grad_y.shape[1:3]
    out = grad_y.shape[-1]
    accumulator = _accumulator(x.dtype)
    gradient_bytes = kernel.size * accumulator.itemsize
    chunk_bytes = max(forms.kernel_grad_chunk_bytes, gradient_bytes)
    chunks = _batch_chunks(b, h * w * 16 * c * x.dtype.itemsize, chunk_bytes)
    xs = x.reshape(b // chunks, chunks, *x.shape[1:])
    gs = grad_y.reshape(b // chunks, chunks, *grad_y.shape[1:])
    if wide_minor is None:
        wide_minor = (forms.kernel_grad_wide_minor and 16 * c > out
                      and gradient_bytes <= forms.kernel_grad_chunk_bytes)
    product = "bhwc,bhwk->ck" if wide_minor else "bhwk,bhwc->kc"

    def add_chunk(k, total):
        x_k = jax.lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
        g_k = jax.lax.dynamic_index_in_dim(gs, k, axis=1, keepdims=False)
        operands = (g_k, _patches(x_k, h, w)) if wide_minor else (_patches(x_k, h, w), g_k)
        return total + jnp.einsum(product, *operands, preferred_element_type=accumulator)

    shape = (out, 16 * c) if wide_minor else (16 * c, out)
    total = jax.lax.fori_loop(0, chunks, add_chunk, jnp.zeros(shape, accumulator))
    if wide_minor:
        total = total.T
    return total.reshape(kernel.shape).astype(kernel.dtype)


def _stride2_conv(x: jax.Array, kernel: jax.Array, forms: CpuForms) -> jax.Array:
    """The strided convolution in the form of this backend and width.

    Inputs of fewer than `FEW_CHANNELS` channels (images) go through `space_to_depth_conv`.
    On CPUs, inputs of `forms.patches_min_channels` or more go through `conv_by_patches`,
    which XLA's CPU backend runs faster than the direct form.
    """
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"A stride-2 convolution here needs an even height and width, "
                         f"got {x.shape[1]}x{x.shape[2]}")
    form = _accelerator_form(kernel)
    if kernel.shape[2] >= forms.patches_min_channels:
        return jax.lax.platform_dependent(
            x, kernel, cpu=functools.partial(conv_by_patches, forms=forms), default=form)
    return form(x, kernel)


def _accelerator_form(kernel: jax.Array) -> Form:
    """The form of `_stride2_conv` that GPUs and TPUs run: space-to-depth for few channels."""
    return space_to_depth_conv if kernel.shape[2] < FEW_CHANNELS else direct_conv


def _stride2_conv_transpose(x: jax.Array, kernel: jax.Array, forms: CpuForms) -> jax.Array:
    """The adjoint of `_stride2_conv(., kernel)`: G's upsampling and the input gradient of
    D's strided convolutions.

    With few channels it is `conv_transpose_by_space_to_depth`. On CPUs it is that too, which
    XLA's CPU backend runs faster than the input-dilated form, or from 4x4
    `conv_transpose_by_patches`. Elsewhere the backend's own transposed convolution (cuDNN's
    on NVIDIA GPUs) is used.
    """
    if kernel.shape[2] < FEW_CHANNELS:
        return conv_transpose_by_space_to_depth(x, kernel)
    cpu = (conv_transpose_by_patches
           if x.shape[1] * x.shape[2] <= forms.patches_transpose_max_pixels
           else conv_transpose_by_space_to_depth)
    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=conv_transpose_input_dilated)


def _stride2_kernel_grad(x: jax.Array, grad_y: jax.Array, kernel: jax.Array,
                         forms: CpuForms) -> jax.Array:
    """The kernel gradient of `_stride2_conv(x, kernel)` given the output's gradient.

    On CPUs it is `kernel_grad_by_matmuls`: XLA's CPU backend runs the convolution form no
    faster, and much slower for large images. Accelerators' convolution libraries have
    kernels for it.
    """
    return jax.lax.platform_dependent(
        x, grad_y, cpu=lambda x, g: kernel_grad_by_matmuls(x, g, kernel, forms=forms),
        default=lambda x, g: kernel_grad_by_convolution(x, g, kernel))


def _patches(x: jax.Array, h: int, w: int) -> jax.Array:
    """The 16 inputs of each of the h x w outputs, tap-major: [b, h, w, 16C]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, i:i + 2 * h:2, j:j + 2 * w:2]
                            for i in range(4) for j in range(4)], axis=-1)


def _patches_adjoint(rows: jax.Array, c: int) -> jax.Array:
    """The adjoint of `_patches`: rows [b, h, w, 16C] added back onto [b, 2h, 2w, C].

    Tap (i, j) of output (p, q) reads padded pixel (2p + i, 2q + j). With i = 2a + r and
    j = 2s + t, that is pixel (r, t) of the padded input's 2x2 block (p + a, q + s), so the
    sum is four shifted copies of the rows, one per block offset (a, s), then one transpose
    from blocks to pixels, less the padding ring. `jax.linear_transpose` of `_patches` pads
    each of the 16 taps to the full size instead: in the 64x64 train step on an AVX-512 Xeon,
    XLA's CPU backend spent 55 ms on that scatter for G's 4x4 -> 8x8 layer, against 10 ms
    on this one (benchmarks/NOTES.md).
    """
    b, h, w, _ = rows.shape
    taps = rows.reshape(b, h, w, 2, 2, 2, 2, c)
    blocks = sum(jnp.pad(taps[:, :, :, a, :, s], ((0, 0), (a, 1 - a), (s, 1 - s), (0, 0),
                                                  (0, 0), (0, 0)))
                 for a in range(2) for s in range(2))
    padded = blocks.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h + 2, 2 * w + 2, c)
    return padded[:, 1:-1, 1:-1]


def _patch_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The strided convolution as the patches of x times the kernel, one matrix product."""
    h, w = x.shape[1] // 2, x.shape[2] // 2
    y = jnp.einsum("bhwk,ko->bhwo", _patches(x, h, w), kernel.reshape(-1, kernel.shape[-1]),
                   preferred_element_type=_accumulator(x.dtype))
    return y.astype(x.dtype)


def _batch_chunks(batch: int, image_bytes: int, chunk_bytes: int) -> int:
    """Loop steps over a batch that give each at most `chunk_bytes` per device, and at
    least one image.

    The train step shards the batch over all devices, so chunk k holds images k, k + n,
    k + 2n, ... (n chunks): each device then reads only its own shard.
    """
    devices = jax.device_count() if batch % jax.device_count() == 0 else 1
    fit = max(1, chunk_bytes // image_bytes)
    per_device = max(d for d in range(1, batch // devices + 1)
                     if (batch // devices) % d == 0 and d <= fit)
    return batch // (per_device * devices)


def _accumulator(dtype: Any) -> Any:
    """The dtype matrix products of `dtype` accumulate in: float32 or wider."""
    return jnp.promote_types(dtype, jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def downsample_conv(x: jax.Array, kernel: jax.Array,
                    forms: CpuForms = CpuForms()) -> jax.Array:
    """PyTorch's Conv2d(k=4, s=2, p=1) on NHWC, with an HWIO kernel, in the CPU `forms`.

    Its gradients are written out so that each backend takes its own form of them: the input
    gradient is the transposed convolution, the kernel gradient a patch product on CPUs.
    """
    return _stride2_conv(x, kernel, forms)


def _downsample_conv_fwd(x: jax.Array, kernel: jax.Array, forms: CpuForms):
    return _stride2_conv(x, kernel, forms), (x, kernel)


def _downsample_conv_bwd(forms: CpuForms, residuals, grad_y):
    x, kernel = residuals
    return (_stride2_conv_transpose(grad_y, kernel, forms),
            _stride2_kernel_grad(x, grad_y, kernel, forms))


downsample_conv.defvjp(_downsample_conv_fwd, _downsample_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def upsample_conv(x: jax.Array, kernel: jax.Array, forms: CpuForms = CpuForms()) -> jax.Array:
    """PyTorch's ConvTranspose2d(k=4, s=2, p=1) on NHWC: the adjoint of `downsample_conv`
    with the same kernel (HWIO of that convolution: [4, 4, out, in] here).

    The gradients are written as those of the strided convolution. Autodiff would take the
    kernel gradient through an input-dilated convolution, which XLA's CPU backend runs
    through a slow generic loop.
    """
    return _stride2_conv_transpose(x, kernel, forms)


def _upsample_conv_fwd(x: jax.Array, kernel: jax.Array, forms: CpuForms):
    return _stride2_conv_transpose(x, kernel, forms), (x, kernel)


def _upsample_conv_bwd(forms: CpuForms, residuals, grad_y):
    x, kernel = residuals
    return (_stride2_conv(grad_y, kernel, forms),
            _stride2_kernel_grad(grad_y, x, kernel, forms))


upsample_conv.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


class DownsampleConv(nn.Module):
    """A resolution-halving Conv(k=4, s=2, p=1) without bias, by `downsample_conv`.

    Its kernel is that of `nn.Conv(features, (4, 4), strides=2, padding=1, use_bias=False)`,
    and it takes that layer's `kernel_init`, `dtype` and `param_dtype`, so either can stand in
    for the other.
    """

    features: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    forms: CpuForms | None = None  # None: this host's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (4, 4, x.shape[-1], self.features),
                            self.param_dtype)
        forms = CpuForms.of_host() if self.forms is None else self.forms
        return downsample_conv(x.astype(self.dtype), kernel.astype(self.dtype), forms)


class UpsampleConv(nn.Module):
    """A resolution-doubling ConvTranspose(k=4, s=2, p=1) without bias, by `upsample_conv`.

    Its kernel is that of `nn.ConvTranspose(features, (4, 4), strides=2, padding=2,
    use_bias=False, transpose_kernel=True)`, and it takes that layer's `kernel_init`, `dtype`
    and `param_dtype`, so either can stand in for the other.
    """

    features: int
    kernel_init: Initializer = nn.initializers.lecun_normal()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    forms: CpuForms | None = None  # None: this host's

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (4, 4, self.features, x.shape[-1]),
                            self.param_dtype)
        forms = CpuForms.of_host() if self.forms is None else self.forms
        return upsample_conv(x.astype(self.dtype), kernel.astype(self.dtype), forms)


# flax's own layers with the kernels, and so the parameters, of DownsampleConv and
# UpsampleConv: plain `lax` convolutions that any backend and converter reads (exports).
PortableDownsampleConv = functools.partial(nn.Conv, kernel_size=(4, 4), strides=(2, 2),
                                           padding=1, use_bias=False)
PortableUpsampleConv = functools.partial(nn.ConvTranspose, kernel_size=(4, 4), strides=(2, 2),
                                         padding=2, use_bias=False, transpose_kernel=True)
