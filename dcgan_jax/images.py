"""Image conversions and grids shared by training, sampling and evaluation."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from dcgan_jax import paths


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [-1, 1] to uint8 in [0, 255]."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, rows: int, padding: int = 2) -> np.ndarray:
    """uint8 [N, H, W, C] as one [rows x cols] uint8 image with a black border."""
    n, h, w, c = images.shape
    cols = -(-n // rows)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c),
                    np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top:top + h, left:left + w] = image
    return grid


def to_pil(image: np.ndarray) -> Image.Image:
    """A uint8 HW or HWC image as a Pillow image; one channel becomes grayscale ("L")."""
    return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 HWC image atomically (on a disk or in a bucket), so a crash never
    leaves a half-written file."""
    with paths.atomic_write(path) as f:
        to_pil(image).save(f, format="PNG")


def upscale(image: Image.Image, min_width: int) -> Image.Image:
    """Enlarged by the smallest whole factor that makes it at least `min_width` wide, nearest
    neighbour: every pixel stays a sharp square."""
    factor = -(-min_width // image.width)
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def save_gif(path: str, frames: Sequence[np.ndarray], fps: float, min_width: int = 256) -> None:
    """A looping GIF of uint8 HW or HWC frames, upscaled to `min_width`: viewers show a GIF at
    its pixel size, and a 32-pixel one is a speck."""
    pictures = [upscale(to_pil(frame), min_width) for frame in frames]
    image_format = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "GIF")
    with paths.atomic_write(path) as f:
        pictures[0].save(f, format=image_format, save_all=True, append_images=pictures[1:],
                         duration=round(1000 / fps), loop=0)


def save_figure(figure: Any, path: str, dpi: int) -> None:
    """A matplotlib figure, written atomically on a disk or in a bucket, in the format its
    extension names (PNG without one)."""
    with paths.atomic_write(path) as f:
        figure.savefig(f, format=os.path.splitext(path)[1][1:].lower() or "png", dpi=dpi)


def sample_classes(indices: np.ndarray, num_classes: int,
                   class_index: int | None = None) -> np.ndarray | None:
    """The classes (int32) of a conditional generator's sample images `indices`, None for
    an unconditional one: all `class_index`, or else class-balanced, image i of class
    i mod num_classes (as in training's sample grids), so that any count is as even as it
    can be and image i of a seed is one image in `sample` and in evaluation."""
    if not num_classes:
        return None
    if class_index is None:
        return (np.asarray(indices) % num_classes).astype(np.int32)
    return np.full(np.shape(indices), class_index, np.int32)
