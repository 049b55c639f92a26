"""Image conversions and grids shared by training, sampling and evaluation."""

from __future__ import annotations

import os
import tempfile
from typing import Sequence

import numpy as np
from PIL import Image


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
    """Writes a uint8 HWC image atomically, so a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        to_pil(image).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:],
                     duration=round(1000 / fps), loop=0)
