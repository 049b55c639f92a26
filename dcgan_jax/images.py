"""Image conversions and grids shared by training, sampling and evaluation."""

from __future__ import annotations

import os
import tempfile

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


def save_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 HWC image atomically, so a crash never leaves a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    image = image[..., 0] if image.shape[-1] == 1 else image
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
