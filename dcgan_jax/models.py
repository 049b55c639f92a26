"""DCGAN generator and discriminator (Radford et al. 2015) with optional MSG-GAN.

One builder serves every power-of-two resolution: the generator starts at 4x4 and doubles
the resolution per block; the discriminator halves it per block down to 4x4. With
Multi-Scale Gradients (Karnewar & Wang 2020) the generator also emits an image after every
intermediate block and the discriminator reads the image of each block's resolution.

Both networks exchange images as a *pyramid*: a tuple ordered from the full resolution
down to 4x4, of length 1 without MSG. Images are NHWC in [-1, 1].

With `num_classes` above 0 both networks take int32 class labels beside their inputs (a
class-conditional GAN, Mirza & Osindero 2014): G by a class embedding joined to z (`concat`)
or class-conditional BatchNorm (`cbn`, as SNGAN and BigGAN), D by one-hot class maps joined
to its input (`concat`) or a projection of its last features (`projection`, Miyato & Koyama
2018). With 0 they are the unconditional networks, parameter for parameter.

`FAMILIES` maps config.model.family to the function that builds a family's two networks.

The resolution-changing layers are fields of the networks (`Generator.upsample`,
`Discriminator.downsample`); by default they are those of `dcgan_jax.strided_conv`.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from dcgan_jax.names import D_CONDITIONINGS, D_NORMS, G_CONDITIONINGS, MSG_COMBINES
from dcgan_jax.strided_conv import DownsampleConv, UpsampleConv

Pyramid = tuple[jax.Array, ...]
# A layer constructor, called as `nn.Conv` is: (features, kernel_init=, dtype=, name=).
ModuleDef = Any


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


def embed_classes(embed: nn.Embed, labels: jax.Array) -> jax.Array:
    """Rows of `embed` for int labels [N]; for float class weights [N, num_classes] their
    weighted sum, so that sampling can move between classes at a fixed z."""
    if jnp.issubdtype(labels.dtype, jnp.integer):
        return embed(labels)
    return jnp.dot(labels, embed.embedding).astype(embed.dtype)


class ClassBatchNorm(nn.Module):
    """BatchNorm whose gain and bias are looked up by class (de Vries et al. 2017, as SNGAN
    and BigGAN's generators): the statistics are shared, the affine map is the class's.
    Gains start at N(1, 0.02) as DCGAN's BatchNorm scales do, biases at 0."""

    num_classes: int
    use_running_average: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, labels: jax.Array) -> jax.Array:
        x = nn.BatchNorm(use_running_average=self.use_running_average, momentum=0.9,
                         epsilon=1e-5, use_scale=False, use_bias=False, dtype=self.dtype)(x)
        features = x.shape[-1]
        gain = embed_classes(nn.Embed(self.num_classes, features, embedding_init=bn_scale_init,
                                      dtype=self.dtype, name="gain"), labels)
        bias = embed_classes(nn.Embed(self.num_classes, features,
                                      embedding_init=nn.initializers.zeros, dtype=self.dtype,
                                      name="bias"), labels)
        return x * gain[:, None, None, :] + bias[:, None, None, :]


def _require_labels(module: nn.Module, labels: jax.Array | None) -> None:
    if module.num_classes and labels is None:
        raise ValueError(f"{type(module).__name__} has num_classes={module.num_classes}: "
                         f"it needs a class label per image")


class Generator(nn.Module):
    """z of size nz -> ConvTranspose/BatchNorm/ReLU blocks -> tanh images.

    Channels are `base_channels * 2**i`, widest at 4x4 and halving per block, so that
    the last hidden block has `base_channels` (pytorch/examples' `ngf`). `upsample` makes
    each resolution-doubling layer; any ConvTranspose(k=4, s=2, p=1) without bias whose
    kernel is [4, 4, out, in] keeps the parameters' names and shapes.

    A conditional G (`num_classes` > 0) takes `labels` [N] (or class weights [N, classes],
    `embed_classes`): `cond='concat'` joins a learned class embedding of z's size to z;
    `cond='cbn'` makes every BatchNorm a ClassBatchNorm.
    """

    resolution: int = 64
    channels: int = 3
    base_channels: int = 64
    msg: bool = False
    dtype: Any = jnp.float32
    upsample: ModuleDef = UpsampleConv
    num_classes: int = 0
    cond: str = "concat"

    @nn.compact
    def __call__(self, z: jax.Array, labels: jax.Array | None = None,
                 train: bool = True) -> Pyramid:
        blocks = num_blocks(self.resolution)
        _require_labels(self, labels)
        if self.num_classes and self.cond not in G_CONDITIONINGS:
            raise ValueError(f"cond={self.cond!r} is not one of {G_CONDITIONINGS}")
        class_norm = self.num_classes and self.cond == "cbn"

        def batch_norm() -> Callable[[jax.Array], jax.Array]:
            if class_norm:
                return functools.partial(ClassBatchNorm(self.num_classes, not train,
                                                        self.dtype), labels=labels)
            return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                scale_init=bn_scale_init, dtype=self.dtype)

        to_image = lambda x: jnp.tanh(  # noqa: E731
            nn.Conv(self.channels, (1, 1), kernel_init=conv_init, dtype=self.dtype)(x))

        if self.num_classes and self.cond == "concat":
            embedding = embed_classes(
                nn.Embed(self.num_classes, z.shape[-1], name="class_embedding"), labels)
            z = jnp.concatenate([z, embedding], axis=-1)
        x = z.reshape(z.shape[0], 1, 1, z.shape[-1]).astype(self.dtype)
        # The 1x1 latent grows to 4x4 (PyTorch: ConvTranspose2d(k=4, s=1, p=0)).
        x = nn.ConvTranspose(self.base_channels * 2 ** (blocks - 1), (4, 4), padding=3,
                             use_bias=False, transpose_kernel=True, kernel_init=conv_init,
                             dtype=self.dtype)(x)
        x = nn.relu(batch_norm()(x))
        side_outputs = []
        # Each block doubles the resolution (PyTorch: ConvTranspose2d(k=4, s=2, p=1)); the
        # names are those nn.ConvTranspose would get.
        upsample = lambda features, index: self.upsample(  # noqa: E731
            features, kernel_init=conv_init, dtype=self.dtype, name=f"ConvTranspose_{index}")
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

    `norm` is `batch` (DCGAN's BatchNorm after every block but the first), `spectral`
    (no BatchNorm; every convolution's kernel divided by its largest singular value, Miyato
    et al. 2018, whose power-iteration state lives in the `batch_stats` collection) or
    `none`. Gradient penalties need `spectral` or `none`: BatchNorm in training mixes the
    images of a batch, so a per-image input gradient means nothing.

    With MSG, the output of each block is combined with the pyramid image of the same
    resolution by `msg_combine`: `simple` concatenates, `lin_cat` concatenates a 1x1
    convolution of the image, `cat_lin` concatenates and then applies a 1x1 convolution.

    `downsample` makes each resolution-halving layer; any Conv(k=4, s=2, p=1) without bias
    keeps the parameters' names and shapes.

    A conditional D (`num_classes` > 0) takes `labels` [N]: `cond='concat'` joins one-hot
    class maps to the full-resolution image; `cond='projection'` adds the inner product of a
    class embedding with the sum over positions of the last block's features to the logit
    (the embedding is spectrally normalised with the convolutions under norm='spectral').
    """

    resolution: int = 64
    base_channels: int = 64
    msg: bool = False
    msg_combine: str = "simple"
    leaky_slope: float = 0.2
    norm: str = "batch"
    dtype: Any = jnp.float32
    downsample: ModuleDef = DownsampleConv
    num_classes: int = 0
    cond: str = "concat"

    @nn.compact
    def __call__(self, pyramid: Pyramid, labels: jax.Array | None = None,
                 train: bool = True) -> jax.Array:
        blocks = num_blocks(self.resolution)
        _require_labels(self, labels)
        if self.num_classes and self.cond not in D_CONDITIONINGS:
            raise ValueError(f"cond={self.cond!r} is not one of {D_CONDITIONINGS}")
        expected = num_scales(self.resolution, self.msg)
        if len(pyramid) != expected:
            raise ValueError(f"Discriminator expects a pyramid of {expected} images, "
                             f"got {len(pyramid)}")
        if self.norm not in D_NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {D_NORMS}")
        # Convolutions are named as nn.Conv would name them all, in the order they are made.
        names = (f"Conv_{n}" for n in itertools.count())
        conv = lambda features, **kw: self._normalised(nn.Conv(  # noqa: E731
            features, kernel_init=conv_init, dtype=self.dtype, name=next(names), **kw), train)
        x = pyramid[0].astype(self.dtype)
        if self.num_classes and self.cond == "concat":
            maps = jax.nn.one_hot(labels, self.num_classes, dtype=self.dtype)
            maps = jnp.broadcast_to(maps[:, None, None, :], (*x.shape[:3], self.num_classes))
            x = jnp.concatenate([x, maps], axis=-1)
        for i in range(blocks):
            if i > 0 and self.msg:
                x = self._combine(x, pyramid[i].astype(self.dtype), conv)
            downsample = self.downsample(self.base_channels * 2**i, kernel_init=conv_init,
                                         dtype=self.dtype, name=next(names))
            x = self._normalised(downsample, train)(x)
            if i > 0 and self.norm == "batch":
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                 scale_init=bn_scale_init, dtype=self.dtype)(x)
            x = nn.leaky_relu(x, self.leaky_slope)
        if self.msg:
            x = self._combine(x, pyramid[blocks].astype(self.dtype), conv)
        logits = conv(1, kernel_size=(4, 4), padding="VALID", use_bias=False)(x).reshape(-1)
        if self.num_classes and self.cond == "projection":
            # Glorot-uniform, as SNGAN's projection: at DCGAN's N(0, 0.02) the class term
            # starts too small for D to learn it within a demo's steps.
            embed = nn.Embed(self.num_classes, x.shape[-1],
                             embedding_init=nn.initializers.xavier_uniform(),
                             dtype=self.dtype, name="class_embedding")
            embedding = self._normalised(embed, train)(labels)
            logits = logits + jnp.sum(x.sum(axis=(1, 2)) * embedding, axis=-1)
        return logits.astype(jnp.float32)

    def _normalised(self, layer: nn.Module, train: bool) -> Callable[[jax.Array], jax.Array]:
        """`layer`, spectrally normalised when norm='spectral' (its power-iteration state is
        updated only in training)."""
        if self.norm == "spectral":
            return lambda x: nn.SpectralNorm(layer)(x, update_stats=train)
        return layer

    def _combine(self, features: jax.Array, image: jax.Array,
                 conv: Callable[..., Callable[[jax.Array], jax.Array]]) -> jax.Array:
        width = features.shape[-1]
        if self.msg_combine == "simple":
            return jnp.concatenate([features, image], axis=-1)
        if self.msg_combine == "lin_cat":
            return jnp.concatenate([features, conv(width, kernel_size=(1, 1))(image)], axis=-1)
        if self.msg_combine == "cat_lin":
            return conv(width, kernel_size=(1, 1))(jnp.concatenate([features, image], axis=-1))
        raise ValueError(f"msg_combine={self.msg_combine!r} is not one of {MSG_COMBINES}")


def dcgan_networks(model: Any, dtype: Any, upsample: ModuleDef = UpsampleConv,
                   downsample: ModuleDef = DownsampleConv) -> tuple[Generator, Discriminator]:
    """DCGAN's G and D (with MSG when model.msg) for config.model `model`."""
    generator = Generator(resolution=model.resolution, channels=model.channels,
                          base_channels=model.ngf, msg=model.msg, dtype=dtype,
                          upsample=upsample, num_classes=model.num_classes, cond=model.g_cond)
    discriminator = Discriminator(resolution=model.resolution, base_channels=model.ndf,
                                  msg=model.msg, msg_combine=model.msg_combine,
                                  leaky_slope=model.leaky_slope, norm=model.d_norm, dtype=dtype,
                                  downsample=downsample, num_classes=model.num_classes,
                                  cond=model.d_cond)
    return generator, discriminator


# config.model.family -> its networks' builder, called as (config.model, dtype, upsample=,
# downsample=); the names are names.MODEL_FAMILIES.
FAMILIES: dict[str, Callable[..., tuple[nn.Module, nn.Module]]] = {"dcgan": dcgan_networks}
