"""DCGAN generator and discriminator (Radford et al. 2015) with optional MSG-GAN.

One builder serves every power-of-two resolution: the generator starts at 4x4 and doubles
the resolution per block; the discriminator halves it per block down to 4x4. With
Multi-Scale Gradients (Karnewar & Wang 2020) the generator also emits an image after every
intermediate block and the discriminator reads the image of each block's resolution.

Both networks exchange images as a *pyramid*: a tuple ordered from the full resolution
down to 4x4, of length 1 without MSG. Images are NHWC in [-1, 1].
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

MIN_RESOLUTION = 32
MAX_RESOLUTION = 256
MSG_COMBINES = ("simple", "lin_cat", "cat_lin")

Pyramid = tuple[jax.Array, ...]


def conv_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """DCGAN initialisation of every convolution: N(0, 0.02)."""
    return 0.02 * jax.random.normal(key, shape, dtype)


def bn_scale_init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    """DCGAN initialisation of BatchNorm scales: N(1, 0.02)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def num_blocks(resolution: int) -> int:
    """Stride-2 blocks between 4x4 and `resolution` (4 at 64x64, 5 at 128x128)."""
    return int(math.log2(resolution)) - 2


def num_scales(resolution: int, msg: bool) -> int:
    """Images in a pyramid: every resolution from full down to 4x4 with MSG, else one."""
    return num_blocks(resolution) + 1 if msg else 1


def image_pyramid(images: jax.Array, scales: int) -> Pyramid:
    """Full-resolution images and their 2x2 average-pooled reductions, largest first."""
    pyramid = [images]
    for _ in range(scales - 1):
        pyramid.append(nn.avg_pool(pyramid[-1], (2, 2), strides=(2, 2)))
    return tuple(pyramid)


_NHWC = ("NHWC", "HWIO", "NHWC")


FEW_CHANNELS = 8

# Batch chunks of the patch-matrix forms XLA's CPU backend runs (benchmarks/NOTES.md): each
# chunk's patches take at most this many bytes per device (and at least one image), so that
# they stay in cache. Kernel gradients raise theirs to the gradient's size.
CONV_CHUNK_BYTES = 8 * 1024 * 1024
KERNEL_GRAD_CHUNK_BYTES = 2 * 1024 * 1024

# On CPUs, stride-2 convolutions of at least this many input channels are patch-matrix
# products. With 64 channels the direct form made the whole train step faster.
PATCHES_MIN_CHANNELS = 128

# On CPUs, transposed convolutions from at most this many pixels (4x4: D's last block's
# input gradient, G's first upsampling) are one matrix product and its scatter.
PATCHES_TRANSPOSE_MAX_PIXELS = 16


def _stride2_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's Conv2d(k=4, s=2, p=1) on NHWC, with an HWIO kernel.

    Sizes must be even, as they are in both networks, so that the adjoint maps back onto
    the same shape. Inputs of fewer than `FEW_CHANNELS` channels (images) go through
    `_space_to_depth_conv`. On CPUs, inputs of `PATCHES_MIN_CHANNELS` or more go through
    `_conv_by_patches`, which XLA's CPU backend runs up to 1.8 times faster than the
    direct form (110 against 194 ms for 512 -> 1024 channels at 8x8, batch 64).
    """
    if x.shape[1] % 2 or x.shape[2] % 2:
        raise ValueError(f"A stride-2 convolution here needs an even height and width, "
                         f"got {x.shape[1]}x{x.shape[2]}")
    form = _accelerator_form(kernel)
    if kernel.shape[2] >= PATCHES_MIN_CHANNELS:
        # A fresh function, so that each trace reads the chunk size anew.
        return jax.lax.platform_dependent(
            x, kernel, cpu=lambda x, k: _conv_by_patches(x, k), default=form)
    return form(x, kernel)


def _accelerator_form(kernel: jax.Array) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The form of `_stride2_conv` that GPUs and TPUs run: space-to-depth for few channels."""
    return _space_to_depth_conv if kernel.shape[2] < FEW_CHANNELS else _direct_conv


def _direct_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                        dimension_numbers=_NHWC)


def _space_to_depth_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_stride2_conv` as a stride-1 2x2 convolution over 2x2 blocks of the padded input.

    Output pixel i reads padded rows 2i..2i+3, which are blocks i and i+1, so folding each
    2x2 block into 4C channels (and the kernel likewise) gives the same products, in
    another order. The 4C channels are zero-padded to a multiple of 8: cuDNN has no fast
    kernels for 3-channel convolutions or their adjoints, and this form took the 128x128
    step on an H100 from 12.4 to 10.5 ms (batch 256, bfloat16; benchmarks/NOTES.md).
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


def _conv_transpose_by_space_to_depth(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of `_space_to_depth_conv(., kernel)`: a stride-1 convolution."""
    b, h, w, _ = x.shape
    primal = jax.ShapeDtypeStruct((b, 2 * h, 2 * w, kernel.shape[2]), x.dtype)
    return jax.linear_transpose(lambda u: _space_to_depth_conv(u, kernel), primal)(x)[0]


def _conv_transpose_input_dilated(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of the direct strided convolution, as flax's nn.ConvTranspose has it."""
    return jax.lax.conv_transpose(x, kernel, (2, 2), ((2, 2), (2, 2)),
                                  dimension_numbers=_NHWC, transpose_kernel=True)


def _patches(x: jax.Array, h: int, w: int) -> jax.Array:
    """The 16 inputs of each of the h x w outputs of `_stride2_conv`, tap-major: [b, h, w, 16C]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.concatenate([padded[:, i:i + 2 * h:2, j:j + 2 * w:2]
                            for i in range(4) for j in range(4)], axis=-1)


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


def _patch_product(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_stride2_conv` as the patches of x times the kernel, one matrix product."""
    h, w = x.shape[1] // 2, x.shape[2] // 2
    y = jnp.einsum("bhwk,ko->bhwo", _patches(x, h, w), kernel.reshape(-1, kernel.shape[-1]),
                   preferred_element_type=_accumulator(x.dtype))
    return y.astype(x.dtype)


def _conv_by_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`_patch_product` in a loop over chunks of the batch (`CONV_CHUNK_BYTES`)."""
    b, height, width, c = x.shape
    h, w = height // 2, width // 2
    chunks = _batch_chunks(b, h * w * 16 * c * x.dtype.itemsize, CONV_CHUNK_BYTES)
    xs = x.reshape(b // chunks, chunks, height, width, c)

    def convolve_chunk(k, ys):
        x_k = jax.lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(ys, _patch_product(x_k, kernel), k, axis=1)

    ys = jax.lax.fori_loop(0, chunks, convolve_chunk,
                           jnp.zeros((b // chunks, chunks, h, w, kernel.shape[-1]), x.dtype))
    return ys.reshape(b, h, w, kernel.shape[-1])


def _conv_transpose_by_patches(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The adjoint of `_patch_product(., kernel)`: x times the kernel's transpose, each
    row added back onto the 16 input pixels its patch came from (the adjoint of
    `_patches`), all in the accumulator's precision."""
    b, h, w, _ = x.shape
    accumulator = _accumulator(x.dtype)
    rows = jnp.einsum("bhwo,ko->bhwk", x, kernel.reshape(-1, kernel.shape[-1]),
                      preferred_element_type=accumulator)
    primal = jax.ShapeDtypeStruct((b, 2 * h, 2 * w, kernel.shape[2]), accumulator)
    return jax.linear_transpose(lambda u: _patches(u, h, w), primal)(rows)[0].astype(x.dtype)


def _stride2_conv_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's ConvTranspose2d(k=4, s=2, p=1): the adjoint of `_stride2_conv(., kernel)`.

    It serves as G's upsampling and as the input gradient of D's strided convolutions.
    With few channels it is `_conv_transpose_by_space_to_depth`. On CPUs it is that too,
    which XLA's CPU backend runs faster than the input-dilated form (35 against 87 ms for
    128 -> 64 channels at 32x32, batch 64), or from 4x4 `_conv_transpose_by_patches`
    (28 ms for 512 -> 256 channels, against the space-to-depth form's 51). Elsewhere the
    backend's own transposed convolution (cuDNN's on NVIDIA GPUs) is used.
    """
    if kernel.shape[2] < FEW_CHANNELS:
        return _conv_transpose_by_space_to_depth(x, kernel)
    cpu = (_conv_transpose_by_patches if x.shape[1] * x.shape[2] <= PATCHES_TRANSPOSE_MAX_PIXELS
           else _conv_transpose_by_space_to_depth)
    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=_conv_transpose_input_dilated)


def _kernel_grad_by_matmuls(x: jax.Array, grad_y: jax.Array, kernel: jax.Array) -> jax.Array:
    """The kernel gradient of `_stride2_conv` as patches of x times the output's gradient,
    summed over chunks of the batch in a loop.

    A chunk's patches take at most `KERNEL_GRAD_CHUNK_BYTES` per device, or the size of the
    kernel gradient if that is larger: adding each chunk's product to a gradient larger
    than the chunk costs more than the cache saves (151 against 179 ms for 512 -> 1024
    channels at 8x8, batch 64).
    """
    b, _, _, c = x.shape
    h, w = grad_y.shape[1:3]
    accumulator = _accumulator(x.dtype)
    chunk_bytes = max(KERNEL_GRAD_CHUNK_BYTES, kernel.size * accumulator.itemsize)
    chunks = _batch_chunks(b, h * w * 16 * c * x.dtype.itemsize, chunk_bytes)
    xs = x.reshape(b // chunks, chunks, *x.shape[1:])
    gs = grad_y.reshape(b // chunks, chunks, *grad_y.shape[1:])

    def add_chunk(k, total):
        x_k = jax.lax.dynamic_index_in_dim(xs, k, axis=1, keepdims=False)
        g_k = jax.lax.dynamic_index_in_dim(gs, k, axis=1, keepdims=False)
        return total + jnp.einsum("bhwk,bhwc->kc", _patches(x_k, h, w), g_k,
                                  preferred_element_type=accumulator)

    total = jax.lax.fori_loop(0, chunks, add_chunk,
                              jnp.zeros((16 * c, grad_y.shape[-1]), accumulator))
    return total.reshape(kernel.shape).astype(kernel.dtype)


def _kernel_grad_by_convolution(x: jax.Array, grad_y: jax.Array,
                                kernel: jax.Array) -> jax.Array:
    """The kernel gradient as autodiff of `_accelerator_form` takes it."""
    return jax.vjp(lambda k: _accelerator_form(kernel)(x, k), kernel)[1](grad_y)[0]


def _stride2_kernel_grad(x: jax.Array, grad_y: jax.Array, kernel: jax.Array) -> jax.Array:
    """The kernel gradient of `_stride2_conv(x, kernel)` given the output's gradient.

    On CPUs it is `_kernel_grad_by_matmuls`: XLA's CPU backend runs the convolution form
    as fast at best and up to 10 times slower (150 against 40 ms for 64 channels at 32x32,
    2.2 against 0.23 s at 64x64, batch 64; benchmarks/NOTES.md). Accelerators' convolution
    libraries have kernels for it.
    """
    return jax.lax.platform_dependent(
        x, grad_y, cpu=lambda x, g: _kernel_grad_by_matmuls(x, g, kernel),
        default=lambda x, g: _kernel_grad_by_convolution(x, g, kernel))


@jax.custom_vjp
def downsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's Conv2d(k=4, s=2, p=1) on NHWC, with `_stride2_kernel_grad`."""
    return _stride2_conv(x, kernel)


def _downsample_conv_fwd(x: jax.Array, kernel: jax.Array):
    return _stride2_conv(x, kernel), (x, kernel)


def _downsample_conv_bwd(residuals, grad_y):
    x, kernel = residuals
    return _stride2_conv_transpose(grad_y, kernel), _stride2_kernel_grad(x, grad_y, kernel)


downsample_conv.defvjp(_downsample_conv_fwd, _downsample_conv_bwd)


@jax.custom_vjp
def upsample_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """PyTorch's ConvTranspose2d(k=4, s=2, p=1) on NHWC: the adjoint of `_stride2_conv`
    with the same kernel (HWIO of that convolution: [4, 4, out, in] here).

    The gradients are written as those of the strided convolution. Autodiff would take the
    kernel gradient through an input-dilated convolution, which XLA's CPU backend runs about
    ten times slower (2.7 s against 0.2 s for the 4x4->8x8 layer at batch 64).
    """
    return _stride2_conv_transpose(x, kernel)


def _upsample_conv_fwd(x: jax.Array, kernel: jax.Array):
    return _stride2_conv_transpose(x, kernel), (x, kernel)


def _upsample_conv_bwd(residuals, grad_y):
    x, kernel = residuals
    return _stride2_conv(grad_y, kernel), _stride2_kernel_grad(grad_y, x, kernel)


upsample_conv.defvjp(_upsample_conv_fwd, _upsample_conv_bwd)


class DownsampleConv(nn.Module):
    """A resolution-halving Conv(k=4, s=2, p=1) without bias, by `downsample_conv`; its
    kernel is that of `nn.Conv`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", conv_init, (4, 4, x.shape[-1], self.features))
        return downsample_conv(x.astype(self.dtype), kernel.astype(self.dtype))


class UpsampleConv(nn.Module):
    """A resolution-doubling ConvTranspose(k=4, s=2, p=1) without bias, by `upsample_conv`;
    its kernel is that of `nn.ConvTranspose(transpose_kernel=True)`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", conv_init, (4, 4, self.features, x.shape[-1]))
        return upsample_conv(x.astype(self.dtype), kernel.astype(self.dtype))


class Generator(nn.Module):
    """z of size nz -> ConvTranspose/BatchNorm/ReLU blocks -> tanh images.

    Channels are `base_channels * 2**i`, widest at 4x4 and halving per block, so that
    the last hidden block has `base_channels` (pytorch/examples' `ngf`).
    """

    resolution: int = 64
    channels: int = 3
    base_channels: int = 64
    msg: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array, train: bool = True) -> Pyramid:
        blocks = num_blocks(self.resolution)
        batch_norm = lambda: nn.BatchNorm(  # noqa: E731
            use_running_average=not train, momentum=0.9, epsilon=1e-5,
            scale_init=bn_scale_init, dtype=self.dtype)
        to_image = lambda x: jnp.tanh(  # noqa: E731
            nn.Conv(self.channels, (1, 1), kernel_init=conv_init, dtype=self.dtype)(x))

        x = z.reshape(z.shape[0], 1, 1, z.shape[-1]).astype(self.dtype)
        # The 1x1 latent grows to 4x4 (PyTorch: ConvTranspose2d(k=4, s=1, p=0)).
        x = nn.ConvTranspose(self.base_channels * 2 ** (blocks - 1), (4, 4), padding=3,
                             use_bias=False, transpose_kernel=True, kernel_init=conv_init,
                             dtype=self.dtype)(x)
        x = nn.relu(batch_norm()(x))
        side_outputs = []
        # Each block doubles the resolution (PyTorch: ConvTranspose2d(k=4, s=2, p=1)); the
        # names are those nn.ConvTranspose would get.
        upsample = lambda features, index: UpsampleConv(  # noqa: E731
            features, dtype=self.dtype, name=f"ConvTranspose_{index}")
        for index, i in enumerate(reversed(range(blocks - 1)), start=1):
            if self.msg:
                side_outputs.append(to_image(x))
            x = nn.relu(batch_norm()(upsample(self.base_channels * 2**i, index)(x)))
        if self.msg:
            side_outputs.append(to_image(x))
        x = upsample(self.channels, blocks)(x)
        images = jnp.tanh(x).astype(jnp.float32)
        return (images,) + tuple(o.astype(jnp.float32) for o in reversed(side_outputs))


class Discriminator(nn.Module):
    """Conv/BatchNorm/LeakyReLU blocks -> one logit per image.

    With MSG, the output of each block is combined with the pyramid image of the same
    resolution by `msg_combine`: `simple` concatenates, `lin_cat` concatenates a 1x1
    convolution of the image, `cat_lin` concatenates and then applies a 1x1 convolution.
    """

    resolution: int = 64
    base_channels: int = 64
    msg: bool = False
    msg_combine: str = "simple"
    leaky_slope: float = 0.2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pyramid: Pyramid, train: bool = True) -> jax.Array:
        blocks = num_blocks(self.resolution)
        expected = num_scales(self.resolution, self.msg)
        if len(pyramid) != expected:
            raise ValueError(f"Discriminator expects a pyramid of {expected} images, "
                             f"got {len(pyramid)}")
        # Convolutions are named as nn.Conv would name them all, in the order they are made.
        names = (f"Conv_{n}" for n in itertools.count())
        conv = lambda features, **kw: nn.Conv(  # noqa: E731
            features, kernel_init=conv_init, dtype=self.dtype, name=next(names), **kw)
        x = pyramid[0].astype(self.dtype)
        for i in range(blocks):
            if i > 0 and self.msg:
                x = self._combine(x, pyramid[i].astype(self.dtype), conv)
            x = DownsampleConv(self.base_channels * 2**i, dtype=self.dtype,
                               name=next(names))(x)
            if i > 0:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 scale_init=bn_scale_init, dtype=self.dtype)(x)
            x = nn.leaky_relu(x, self.leaky_slope)
        if self.msg:
            x = self._combine(x, pyramid[blocks].astype(self.dtype), conv)
        logits = conv(1, kernel_size=(4, 4), padding="VALID", use_bias=False)(x)
        return logits.reshape(-1).astype(jnp.float32)

    def _combine(self, features: jax.Array, image: jax.Array,
                 conv: Callable[..., nn.Module]) -> jax.Array:
        width = features.shape[-1]
        if self.msg_combine == "simple":
            return jnp.concatenate([features, image], axis=-1)
        if self.msg_combine == "lin_cat":
            return jnp.concatenate([features, conv(width, kernel_size=(1, 1))(image)], axis=-1)
        if self.msg_combine == "cat_lin":
            return conv(width, kernel_size=(1, 1))(jnp.concatenate([features, image], axis=-1))
        raise ValueError(f"msg_combine={self.msg_combine!r} is not one of {MSG_COMBINES}")
