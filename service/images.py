"""Image instances: {"b64": "<PNG or JPEG>"} (as KServe V1 sends them) decoded to the
model's pixels, channels-first in [0, 1] (8-bit values / 255, as training.images loads them).

The header is read before any pixel: a wrong size or mode is refused without decoding, so a
small body cannot make the server decode a huge image.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.images import PIXEL_SCALE

FORMATS = ("PNG", "JPEG")
MODES = {1: "L", 3: "RGB"}  # channels -> the mode an image is converted to


class ImageError(ValueError):
    """What is wrong with one image instance (the message names no location)."""


def takes_images(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[0] in MODES


def decode(text: object, shape: tuple[int, ...]) -> np.ndarray:
    """A base64 PNG or JPEG -> float64 pixels of `shape` [C, H, W]."""
    channels, height, width = shape
    if not isinstance(text, str):
        raise ImageError(f'"b64" must be a string of base64, got {type(text).__name__}')
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError('"b64" is not valid base64') from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombWarning):
        raise ImageError(f"not a {' or '.join(FORMATS)} image") from None
    with image:
        if image.size != (width, height):
            raise ImageError(
                f"the image is {image.size[0]}x{image.size[1]} (width x height); "
                f"the model takes {width}x{height}"
            )
        try:
            pixels = np.asarray(image.convert(MODES[channels]), dtype=np.float64)
        except (OSError, ValueError) as exc:
            raise ImageError(f"the image cannot be decoded ({exc})") from None
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return pixels / PIXEL_SCALE
