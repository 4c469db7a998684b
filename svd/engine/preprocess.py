"""The mapping from an encoded image to the engine's input: one function for serving and training.

Validators of today send images at their native size (dashcam frames,
1024x1024 synthetic images, phone photos of several megapixels, portrait as
well as landscape); the engine takes (224, 224, 3) uint8 RGB. How one becomes
the other belongs to the engine, is recorded in its manifest (`preprocess`),
and is applied by to_input() both when a query is answered (svd.serve.decode)
and when training renders a view (svd.train.features), so an engine is always
fed the way it was trained (docs/engine-format.md, "Preprocess").

Mappings:
- `squash`: the whole image resized to 224x224, aspect ratio not kept (what
  the reference miner's ViT image processor does);
- `letterbox`: the whole image fitted inside 224x224, aspect kept, black bars;
- `center_crop`: the centred square of the short side, resized to 224x224
  (January's validators at level 0).

A JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose pixels still
cover what the mapping resamples to 224 (`draft`): libjpeg then does a
fraction of the work, and never the full-size pixels of a 12 MP photo.
Engines written before the manifest named a mapping keep LEGACY, what svd
always did for them: squash, bilinear, reduced JPEG decode.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

SIZE = 224
MAPPINGS = ("squash", "letterbox", "center_crop")
RESAMPLES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the engine's input.

    Attributes:
        mapping: one of MAPPINGS.
        resample: one of RESAMPLES (PIL's filter, antialiased when shrinking).
        draft: decode JPEGs at a reduced DCT scale where that still covers the target.
    """

    mapping: str = "squash"
    resample: str = "bilinear"
    draft: bool = True

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {', '.join(MAPPINGS)}, got {self.mapping!r}")
        if self.resample not in RESAMPLES:
            raise ValueError(f"resample must be one of {', '.join(RESAMPLES)}, got {self.resample!r}")

    @property
    def key(self) -> str:
        """A short name that changes whenever the pixels would (cache keys, logs, status)."""
        return f"{self.mapping}-{self.resample}" + ("" if self.draft else "-full")


# What engines without a `preprocess` field in their manifest were always fed.
LEGACY = Preprocess("squash", "bilinear", draft=True)
# What new engines record unless told otherwise (the choice is measured in docs/benchmarks.md).
DEFAULT = Preprocess("squash", "bilinear", draft=True)


def to_input(im: Image.Image, p: Preprocess, size: int = SIZE) -> np.ndarray:
    """The engine input (size, size, 3) uint8 RGB of an opened, not yet loaded, image.

    Call it on what Image.open() returned, before anything reads the pixels:
    the reduced JPEG decode must be chosen before decoding starts. EXIF
    orientation is not applied (validators never apply it).
    """
    width, height = im.size
    box, content, offset = _plan(width, height, p.mapping, size)
    if p.draft and im.format == "JPEG":
        bw, bh = box[2] - box[0], box[3] - box[1]
        wanted = (math.ceil(content[0] * width / bw), math.ceil(content[1] * height / bh))
        im.draft("RGB", wanted)
    rgb = im.convert("RGB")
    if rgb.size != (width, height):  # decoded at a reduced scale: the box shrinks with it
        # Multiply before dividing: the whole image's box lands exactly on the reduced size.
        w, h = rgb.size
        box = (box[0] * w / width, box[1] * h / height, box[2] * w / width, box[3] * h / height)
    if box != (0.0, 0.0, float(rgb.width), float(rgb.height)):
        # A crop, then a resize: resize(box=...) would let the filter reach past the box.
        rgb = rgb.crop((round(box[0]), round(box[1]), round(box[2]), round(box[3])))
    fitted = rgb if rgb.size == content else rgb.resize(content, RESAMPLES[p.resample])
    if content == (size, size):
        return np.asarray(fitted, dtype=np.uint8)
    canvas = Image.new("RGB", (size, size))  # black bars, as a letterbox has them
    canvas.paste(fitted, offset)
    return np.asarray(canvas, dtype=np.uint8)


def map_bytes(data: bytes, p: Preprocess, size: int = SIZE) -> np.ndarray:
    """to_input() of encoded image bytes (training's views; no limits: the caller trusts them)."""
    with Image.open(io.BytesIO(data)) as im:
        return to_input(im, p, size)


def center_square(width: int, height: int) -> tuple[int, int, int, int]:
    """The centred square of the short side, (left, top, right, bottom), with torchvision's
    CenterCrop offsets: Python round(), so halves go to the even side."""
    side = min(width, height)
    left = round((width - side) / 2.0)
    top = round((height - side) / 2.0)
    return left, top, left + side, top + side


def _plan(width: int, height: int, mapping: str, size: int) -> tuple[Box, tuple[int, int], tuple[int, int]]:
    """(source box, size it is resampled to, where that lands on the size x size input)."""
    full: Box = (0.0, 0.0, float(width), float(height))
    if mapping == "squash":
        return full, (size, size), (0, 0)
    if mapping == "center_crop":
        left, top, right, bottom = center_square(width, height)
        return (float(left), float(top), float(right), float(bottom)), (size, size), (0, 0)
    scale = size / max(width, height)
    fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
    return full, fitted, ((size - fitted[0]) // 2, (size - fitted[1]) // 2)
