"""Image bytes to the engine's input: base64 -> image of any size -> the engine's mapping -> RGB 224x224.

Runs in a small thread pool, never on the event loop. The pixel count is read
from the header and checked before anything is decoded (decompression bombs);
the mapping itself (svd.engine.preprocess) is the engine's, the same function
training renders its views with. Every way a hostile or broken image can fail
becomes BadRequest or PayloadTooLarge.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from svd.engine.preprocess import LEGACY, Preprocess, to_input
from svd.errors import BadRequest, PayloadTooLarge


@dataclass(frozen=True)
class DecodeLimits:
    max_image_bytes: int
    max_pixels: int
    formats: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded query image: what the engine takes, and what the sample log keeps."""

    pixels: np.ndarray  # (224, 224, 3) uint8 RGB
    raw: bytes  # the encoded image as the caller sent it
    format: str  # PIL's name, lower case: "jpeg", "png", "webp"
    preprocess: Preprocess  # the mapping the pixels were made with


def decode_image(b64: str, limits: DecodeLimits, preprocess: Preprocess = LEGACY) -> np.ndarray:
    """Decode a base64 image into a (224, 224, 3) uint8 RGB array."""
    return decode(b64, limits, preprocess).pixels


def decode(b64: str, limits: DecodeLimits, preprocess: Preprocess = LEGACY) -> Decoded:
    """Decode a base64 image with the engine's mapping; the pixels, and the bytes and format they came from."""
    if not b64:
        raise BadRequest("field image is empty", reason="bad_image")
    # base64 is 4/3 of the bytes: refuse before decoding anything.
    if len(b64) > (limits.max_image_bytes * 4) // 3 + 4:
        raise PayloadTooLarge(f"image is larger than {limits.max_image_bytes} bytes")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field image is not valid base64", reason="bad_image") from None
    return decode_raw(raw, limits, preprocess)


def decode_raw(raw: bytes, limits: DecodeLimits, preprocess: Preprocess) -> Decoded:
    """Decode encoded image bytes (no base64) with the given mapping."""
    try:
        with Image.open(io.BytesIO(raw), formats=list(limits.formats)) as im:
            width, height = im.size
            if width * height > limits.max_pixels:
                raise PayloadTooLarge(f"image has {width}x{height} pixels, more than {limits.max_pixels}")
            fmt = (im.format or "unknown").lower()
            pixels = to_input(im, preprocess)
    except PayloadTooLarge:
        raise
    except Image.UnidentifiedImageError:
        raise BadRequest(f"image is not one of {', '.join(limits.formats)}", reason="bad_image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # PIL raises above twice its MAX_IMAGE_PIXELS; between once and twice it only warns (an
        # error where warnings are errors, as in the tests) and our own pixel limit, far lower, refuses.
        raise PayloadTooLarge("image is a decompression bomb") from None
    except Exception as e:  # truncated data, broken headers, PIL's own limits
        raise BadRequest(f"image cannot be decoded: {type(e).__name__}", reason="bad_image") from None
    return Decoded(pixels, raw, fmt, preprocess)
