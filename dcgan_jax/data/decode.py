"""Records to training images: mode conversion, crop, antialiased resize, uint8 HWC out.

Scaling to [-1, 1] and flips happen on the device. Image files that cannot be decoded are
marked unreadable (and skipped by the pipeline) rather than stopping the run; a crop that
does not fit an image is a config error and always raises.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
from PIL import Image

from dcgan_jax.data.sources import DataError

# Larger image files are skipped as unreadable: one such image decodes to 300 MB or more.
# Checked here rather than through Pillow's process-wide Image.MAX_IMAGE_PIXELS.
MAX_PIXELS = 100_000_000
# Modes Pillow's Image.reduce takes; palette and bilevel images are only cropped.
REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "F")
STRIP_BYTES = 16 << 20


class CropError(DataError):
    """config.data.crop does not fit an image: a config problem, never skipped."""


def crop_box(width: int, height: int, crop: str) -> tuple[int, int, int, int]:
    """PIL (left, upper, right, lower) of a centred square or a fixed 'top,left,h,w' box."""
    if crop == "center":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side
    top, left, h, w = (int(p) for p in crop.split(","))
    if top + h > height or left + w > width:
        raise CropError(f"config.data.crop={crop!r} (top,left,height,width) does not fit "
                        f"inside a {width}x{height} image")
    return left, top, left + w, top + h


def _open_file(path: str, resolution: int, crop: str) -> tuple[Image.Image, tuple[int, int]]:
    """The decoded image and the file's size in pixels. A JPEG at least four times
    larger than needed decodes at a reduced scale (1/2 to 1/8, Pillow's draft), leaving
    the final Lanczos resize at least a 2x reduction."""
    image = Image.open(path)
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ValueError(f"{width}x{height} pixels, more than {MAX_PIXELS:,}")
    if image.format == "JPEG":
        left, top, right, bottom = crop_box(width, height, crop)
        factor = min(right - left, bottom - top) / (2 * resolution)
        if factor >= 2:
            image.draft(None, (math.ceil(width / factor), math.ceil(height / factor)))
    image.load()  # Decodes now, so that truncated files fail here.
    return image, (width, height)


def _to_pil(array: Any) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


def _convert_mode(image: Image.Image, channels: int) -> Image.Image:
    """Grayscale, palette, CMYK and alpha images to L or RGB; transparency becomes white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L" if channels == 1 else "RGB")


def _reduce_in_strips(image: Image.Image, factor: int,
                      box: tuple[int, int, int, int]) -> Image.Image:
    """Image.reduce of `box`, a strip of at most STRIP_BYTES at a time: Pillow copies a
    whole image with alpha to premultiply it before reducing."""
    left, top, right, bottom = box
    width, height = (right - left) // factor, (bottom - top) // factor
    rows = max(1, STRIP_BYTES // (4 * (right - left) * factor))
    reduced = Image.new(image.mode, (width, height))
    for row in range(0, height, rows):
        end = min(height, row + rows)
        strip = image.crop((left, top + row * factor, left + width * factor, top + end * factor))
        reduced.paste(strip.reduce(factor), (0, row))
    return reduced


def _preprocess(image: str | Any, resolution: int, channels: int, crop: str) -> np.ndarray:
    if isinstance(image, str):
        pil, (width, height) = _open_file(image, resolution, crop)
        scale = pil.width / width  # below 1 when decoded at a reduced scale
        box = tuple(min(round(v * scale), limit) for v, limit in
                    zip(crop_box(width, height, crop), pil.size * 2, strict=True))
    else:
        pil = _to_pil(image)
        box = crop_box(pil.width, pil.height, crop)
    factor = min(box[2] - box[0], box[3] - box[1]) // (2 * resolution)
    if factor >= 2 and pil.mode in REDUCIBLE_MODES:
        pil = _reduce_in_strips(pil, factor, box)
    else:
        pil = pil.crop(box)
    pil = _convert_mode(pil, channels)
    if pil.size != (resolution, resolution):
        pil = pil.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(pil, dtype=np.uint8)
    return array[..., None] if channels == 1 else array


def preprocess(image: str | Any, resolution: int, channels: int, crop: str) -> np.ndarray:
    """An image file's path or an image array as uint8 [resolution, resolution, channels].

    Memory stays near one decoded image: the crop is cut before the mode conversion, and a
    crop at least four times larger than needed is first box-reduced by a whole factor.
    Pillow's warning of images above its own bound (at open and crop) is silenced here,
    as MAX_PIXELS bounds them; above twice its bound Pillow refuses them (unreadable).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return _preprocess(image, resolution, channels, crop)


UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class Loader:
    """Picklable per-record transform for grain workers.

    A record {"image": path or array[, "label": int]} becomes {"image": uint8 array,
    ["label": int32,] "unreadable": ""}, or, for an image file that cannot be decoded,
    {"image": zeros, ["label": int32,] "unreadable": path}: the label stays with its record
    until the pipeline drops both. Other records must decode. Flips are not done here but
    on the device, in the train step.
    """

    resolution: int
    channels: int
    crop: str

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        image, unreadable = record["image"], ""
        try:
            decoded = preprocess(image, self.resolution, self.channels, self.crop)
        except CropError:
            raise
        except UNREADABLE:
            if not isinstance(image, str):
                raise
            decoded = np.zeros((self.resolution, self.resolution, self.channels), np.uint8)
            unreadable = image
        element = {"image": decoded, "unreadable": unreadable}
        if "label" in record:
            element["label"] = np.int32(record["label"])
        return element


def loader_from_config(config: Any) -> Loader:
    return Loader(config.model.resolution, config.model.channels, config.data.crop)
