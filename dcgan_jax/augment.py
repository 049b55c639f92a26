"""DiffAugment (Zhao et al. 2020): differentiable augmentations of D's inputs.

D sees real and fake images through the same random policy, in its own update and in G's,
and G's gradient flows back through the augmentation, so D cannot overfit a small dataset
without G following. Each image of a batch draws its own parameters.

An augmentation acts on a pyramid (MSG-GAN's images at every scale, largest first) as on one
image: every scale gets the same colour factors, and translations and cutout boxes drawn in
full-resolution pixels and scaled to each scale's pixels. The constants are those of the
authors' code: translations by up to 1/8 of the side, cutouts of half the side.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from dcgan_jax.models import Pyramid

TRANSLATION_RATIO = 0.125
CUTOUT_RATIO = 0.5

Parameters = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """`draw(key, images)` gives each image of the full-resolution batch its parameters;
    `apply(pyramid, parameters)` augments every scale with them."""

    draw: Callable[[jax.Array, jax.Array], Parameters]
    apply: Callable[[Pyramid, Parameters], Pyramid]


def _draw_color(key: jax.Array, images: jax.Array) -> Parameters:
    brightness_key, saturation_key, contrast_key = jax.random.split(key, 3)
    batch = images.shape[0]
    return {"brightness": jax.random.uniform(brightness_key, (batch,)) - 0.5,
            "saturation": jax.random.uniform(saturation_key, (batch,)) * 2.0,
            "contrast": jax.random.uniform(contrast_key, (batch,)) + 0.5}


def _apply_color(pyramid: Pyramid, p: Parameters) -> Pyramid:
    """Brightness + U(-0.5, 0.5), saturation x U(0, 2) about the channels' mean, contrast
    x U(0.5, 1.5) about the image's mean, in that order."""
    brightness, saturation, contrast = (p[k][:, None, None, None]
                                        for k in ("brightness", "saturation", "contrast"))

    def adjust(x: jax.Array) -> jax.Array:
        x = x + brightness
        gray = x.mean(axis=-1, keepdims=True)
        x = (x - gray) * saturation + gray
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        return (x - mean) * contrast + mean

    return tuple(adjust(x) for x in pyramid)


def max_translation(images: jax.Array) -> tuple[int, int]:
    """The largest shift, in pixels, down and across."""
    height, width = images.shape[1:3]
    return int(height * TRANSLATION_RATIO + 0.5), int(width * TRANSLATION_RATIO + 0.5)


def _draw_translation(key: jax.Array, images: jax.Array) -> Parameters:
    max_dy, max_dx = max_translation(images)
    y_key, x_key = jax.random.split(key)
    batch = images.shape[0]
    return {"dy": jax.random.randint(y_key, (batch,), -max_dy, max_dy + 1),
            "dx": jax.random.randint(x_key, (batch,), -max_dx, max_dx + 1)}


def _apply_translation(pyramid: Pyramid, p: Parameters) -> Pyramid:
    """Output pixel (i, j) reads input pixel (i + dy, j + dx), or zero outside the image, as
    in the authors' code; at a smaller scale the shift is rounded to its pixels."""
    height, width = pyramid[0].shape[1:3]
    max_dy, max_dx = max_translation(pyramid[0])

    def shift(x: jax.Array) -> jax.Array:
        h, w, c = x.shape[1:]
        pad_y, pad_x = round(max_dy * h / height), round(max_dx * w / width)
        dy = jnp.round(p["dy"] * h / height).astype(jnp.int32)
        dx = jnp.round(p["dx"] * w / width).astype(jnp.int32)
        padded = jnp.pad(x, ((0, 0), (pad_y, pad_y), (pad_x, pad_x), (0, 0)))
        return jax.vmap(lambda image, row, col: jax.lax.dynamic_slice(
            image, (row + pad_y, col + pad_x, 0), (h, w, c)))(padded, dy, dx)

    return tuple(shift(x) for x in pyramid)


def cutout_size(images: jax.Array) -> tuple[int, int]:
    """The cut square's height and width in pixels: half the image's."""
    height, width = images.shape[1:3]
    return int(height * CUTOUT_RATIO + 0.5), int(width * CUTOUT_RATIO + 0.5)


def _draw_cutout(key: jax.Array, images: jax.Array) -> Parameters:
    """The square's top-left corner: its centre anywhere in the image, so that it may reach
    past the border (as in the authors' code)."""
    height, width = images.shape[1:3]
    size_y, size_x = cutout_size(images)
    y_key, x_key = jax.random.split(key)
    batch = images.shape[0]
    top = jax.random.randint(y_key, (batch,), 0, height + 1 - size_y % 2) - size_y // 2
    left = jax.random.randint(x_key, (batch,), 0, width + 1 - size_x % 2) - size_x // 2
    return {"top": top, "left": left}


def _apply_cutout(pyramid: Pyramid, p: Parameters) -> Pyramid:
    """Zeroes the pixels whose centres lie in the square (at full resolution: its pixels)."""
    height, width = pyramid[0].shape[1:3]
    size_y, size_x = cutout_size(pyramid[0])

    def inside(start: jax.Array, size: int, pixels: int, full: int) -> jax.Array:
        centres = (jnp.arange(pixels) + 0.5) * (full / pixels)
        return (centres >= start[:, None]) & (centres < start[:, None] + size)

    def cut(x: jax.Array) -> jax.Array:
        h, w = x.shape[1:3]
        box = (inside(p["top"], size_y, h, height)[:, :, None]
               & inside(p["left"], size_x, w, width)[:, None, :])
        return x * jnp.where(box, 0.0, 1.0)[..., None].astype(x.dtype)

    return tuple(cut(x) for x in pyramid)


AUGMENTATIONS: dict[str, Augmentation] = {
    "color": Augmentation(_draw_color, _apply_color),
    "translation": Augmentation(_draw_translation, _apply_translation),
    "cutout": Augmentation(_draw_cutout, _apply_cutout),
}


def parse_policy(text: str) -> tuple[str, ...]:
    """config.train.augment as names in order: 'color,cutout' -> ('color', 'cutout')."""
    return tuple(text.split(",")) if text else ()


def diff_augment(pyramid: Pyramid, policy: Sequence[str], key: jax.Array) -> Pyramid:
    """The pyramid through each augmentation of `policy` in order, each keyed apart."""
    for index, name in enumerate(policy):
        augmentation = AUGMENTATIONS[name]
        parameters = augmentation.draw(jax.random.fold_in(key, index), pyramid[0])
        pyramid = augmentation.apply(pyramid, parameters)
    return pyramid
