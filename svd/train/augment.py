"""Training views distorted the way NATIX validators distort their challenges.

A view is what a miner receives: levels 0-3 (protocol.md, "The query"), then
PIL's default JPEG (q75, 4:2:0), decoded. A seed fixes every random choice, so
the feature cache can key views by (image hash, view seed, AUGMENT_VERSION).

albumentations runs the pipeline: composition, the random draws (each
distortion's off/strength choice, angle, crop box), rotation, downscale,
contrast and blur. Three steps are our own transforms, as no built-in one
matches the validator: the crop's resize, colour saturation, colour noise.

Details taken from the subnet's code (natixnetwork/streetvision-subnet at
28a1755, January 2026) that protocol.md leaves out:

- natix/utils/image_transforms.py: levels 1-3 run on a float tensor
  (ToTensor, values k/255). RandomRotationWithParams is built with BILINEAR
  but its forward calls F.rotate(img, angle) with the defaults: NEAREST,
  expand=False, fill 0, centre ((w-1)/2, (h-1)/2), counter-clockwise. Flips
  keep an empty params dict, so the "draw" branch never runs: no flips.
- RandomResizedCrop uses torchvision's sampler (10 tries, then a centre
  crop; square since ratio is (1, 1)) and F.resized_crop, i.e.
  torch.nn.functional.interpolate(bilinear, antialias=True) on the float
  crop. We call that same function: albumentations resizes with cv2, which
  aliases (or box-filters with INTER_AREA), much sharper than theirs. Its
  float32 sums land a hair under k/255 in flat areas, so after truncation a
  quarter to a half of a flat area (blown-out sky: 255) drops one level;
  PIL's float resize, same filter, does not.
- Every distortion first truncates: (img * 255).astype(uint8) on BGR, and
  ToPILImage truncates too (mul(255).byte()), so levels 1-3 floor the float
  crop once. k/255 * 255 is exact in float32, so later truncations are
  lossless. Level 0 instead resizes uint8 in PIL, which rounds.
- Level 0: CenterCrop offsets are int(round((size - side) / 2)) (to even),
  then Resize((224, 224)) on the PIL image: PIL BILINEAR.
- Saturation goes through cv2's float YCrCb (chroma zero 0.5) with
  studio-swing constants meant for [0, 1] applied to 0-255 values. Worked
  through, chroma C becomes f*C + (1-f)*111.5/224: luma is kept, the pivot
  sits 0.0022 below neutral, so a neutral grey (k, k, k) comes back as
  (k-1, k, k-1). No clip before the uint8 cast; values stay in (-1, 256),
  where that cast equals clip-then-truncate.
- Contrast: float32 multiply, truncate: albumentations' contrast, bit for bit.
- "JPEG": cv2.resize to (224 // 2) or (224 // 3) = 112 or 74 px, INTER_LINEAR
  (no antialiasing), and back with INTER_LINEAR, on uint8.
- Noise: std(v) * N(0, 1) added per YCbCr channel on their [0, 1] studio
  scale, which is 255 * 255 / 219 per unit on cv2's Y and 255 * 255 / 224 on
  Cr and Cb; numpy float64; clip to [0, 255], then truncate.
- Blur: cv2.GaussianBlur(img, (k, k), k / 6), border reflect-101.
  albumentations' GaussianBlur builds the same kernel; its float filter
  rounds differently from cv2's fixed point on a few % of pixels (by 1).
- natix/protocol.py saves the challenge with image.save(buf, format="JPEG").
- natix/validator/cache/extract.py writes real images with img.save(path)
  in their own format: JPEG sources are re-encoded at PIL's default quality
  before any distortion. EXIF orientation is never applied.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# albumentations asks PyPI for a newer release at every import (up to 2 s, and a
# warning offline): a miner's daemon must never phone anywhere. Set before the import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

AUGMENT_VERSION = 1
SIZE = 224
LEVELS = (0, 1, 2, 3)
LEVEL_PROBS = (0.25, 0.25, 0.25, 0.25)
ROTATE_LIMIT = 20.0
CROP_SCALE = (0.2, 1.0)
# Strength 1 and strength 2 of each distortion; level 2 only uses strength 1.
SATURATION = (0.4, 0.3)
CONTRAST = (0.85, 0.725)
DOWNSCALE = (SIZE // 2, SIZE // 3)
NOISE_VARIANCE = (0.001, 0.002)
BLUR_KERNEL = (7, 9)

# Where the validator's saturation pivots chroma in cv2's float YCrCb (see above).
_SATURATION_PIVOT = 111.5 / 224.0
# One unit of their [0, 1] studio-scale noise, in cv2's 0-255 Y and chroma.
_NOISE_GAIN = np.array([255.0 * 255.0 / 219.0, 255.0 * 255.0 / 224.0, 255.0 * 255.0 / 224.0])
_JPEG_MODES = ("RGB", "L", "CMYK")

ImageLike = np.ndarray | Image.Image


@dataclass(frozen=True)
class View:
    """One distorted view, as a miner receives it.

    Attributes:
        image: (224, 224, 3) uint8 RGB, the decoded JPEG.
        jpeg: the JPEG bytes the validator would send (before base64).
        level: the distortion level used, 0-3.
    """

    image: np.ndarray
    jpeg: bytes
    level: int


class ValidatorResizedCrop(A.RandomResizedCrop):
    """albumentations' RandomResizedCrop sampler with torchvision's resize (resize_antialiased).

    Takes RandomResizedCrop's arguments (size, scale, ratio, p).
    """

    def apply(self, img: np.ndarray, crop_coords: tuple[int, int, int, int], **params: Any) -> np.ndarray:
        x_min, y_min, x_max, y_max = crop_coords
        return resize_antialiased(img[y_min:y_max, x_min:x_max], self.size)


class PilBilinearResize(A.ImageOnlyTransform):
    """Resize to a square with PIL's BILINEAR filter (antialiased, rounds to uint8), as level 0 does.

    Args:
        size: side of the result in pixels.
        p: probability of applying.
    """

    def __init__(self, size: int = SIZE, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.size = size

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        resized = Image.fromarray(img).resize((self.size, self.size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size",)


class ValidatorSaturation(A.ImageOnlyTransform):
    """Scale chroma keeping luma, the validator's way (see the module docstring).

    ColorJitter's saturation is the same blend in principle, but rounds where
    the validator truncates, from a rounded grey.

    Args:
        factor: chroma multiplier (0.4 or 0.3 in the validator).
        p: probability of applying.
    """

    def __init__(self, factor: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.factor = factor

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        ycrcb = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2YCrCb)
        ycrcb[..., 1:] = ycrcb[..., 1:] * self.factor + _SATURATION_PIVOT * (1.0 - self.factor)
        return _truncate(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("factor",)


class ValidatorColorNoise(A.ImageOnlyTransform):
    """Gaussian noise of the given variance in the validator's YCbCr scale.

    GaussNoise draws RGB channels independently; here the noise lives in
    YCbCr, so the RGB channels are correlated, with standard deviations of
    about 16/12/19 (R/G/B) at variance 0.001.

    Args:
        variance: noise variance on their [0, 1] scale (0.001 or 0.002).
        p: probability of applying.
    """

    def __init__(self, variance: float, p: float = 1.0) -> None:
        super().__init__(p=p)
        self.variance = variance

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        return {"normal": self.random_generator.standard_normal((height, width, 3))}

    def apply(self, img: np.ndarray, normal: np.ndarray, **params: Any) -> np.ndarray:
        ycrcb = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_RGB2YCrCb)
        noisy = (ycrcb + normal * (math.sqrt(self.variance) * _NOISE_GAIN)).astype(np.float32)
        return _truncate(cv2.cvtColor(noisy, cv2.COLOR_YCrCb2RGB))

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("variance",)


def resize_antialiased(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize uint8 RGB as torchvision resizes a ToTensor image, then truncate to uint8.

    Only the resampling runs in torch; numpy's float32 division and product
    round exactly as torch's do.

    Args:
        img: (H, W, 3) uint8.
        size: (height, width) of the result.
    """
    chw = np.ascontiguousarray(img.transpose(2, 0, 1)).astype(np.float32) / np.float32(255)
    out = F.interpolate(torch.from_numpy(chw)[None], size=size, mode="bilinear", align_corners=False, antialias=True)
    return _truncate(out[0].numpy().transpose(1, 2, 0) * np.float32(255))


def build_pipeline(level: int, height: int, width: int) -> A.Compose:
    """The albumentations pipeline of one level for an image of the given size.

    The result holds random state: build one per call, or per thread.

    Args:
        level: 0-3, as the validator numbers them.
        height: source image height in pixels.
        width: source image width in pixels.
    """
    _check_level(level)
    if level == 0:
        return A.Compose([A.Crop(*_center_square(height, width)), PilBilinearResize(SIZE)])
    steps: list[A.BasicTransform | A.BaseCompose] = [
        A.Rotate(
            limit=(-ROTATE_LIMIT, ROTATE_LIMIT),
            interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            crop_border=False,
            p=1.0,
        ),
        ValidatorResizedCrop(size=(SIZE, SIZE), scale=CROP_SCALE, ratio=(1.0, 1.0), p=1.0),
    ]
    if level >= 2:
        strengths = 1 if level == 2 else 2
        steps += [
            _off_or([ValidatorSaturation(f) for f in SATURATION[:strengths]]),
            _off_or([_contrast(f) for f in CONTRAST[:strengths]]),
            _off_or([_downscale(n) for n in DOWNSCALE[:strengths]]),
        ]
    if level == 3:
        steps += [
            _off_or([ValidatorColorNoise(v) for v in NOISE_VARIANCE]),
            _off_or([A.GaussianBlur(blur_limit=(k, k), sigma_limit=(k / 6, k / 6), p=1.0) for k in BLUR_KERNEL]),
        ]
    return A.Compose(steps)


def render_view(
    image: ImageLike,
    seed: int,
    level: int | None = None,
    *,
    resave_jpeg: bool = False,
    level_probs: Sequence[float] = LEVEL_PROBS,
) -> View:
    """Distort one image as a validator would, reproducibly.

    Args:
        image: RGB uint8 array (H, W, 3) or (H, W), or a PIL image in any
            mode (converted to RGB as the validator does). Do not apply EXIF
            orientation: validators don't.
        seed: non-negative integer; fixes the level (unless given) and every
            other random choice. Level 0 has nothing random, so every seed
            that draws level 0 gives the same view of an image.
        level: force a level 0-3. The seed still draws a level first, so
            render_view(img, s, view_level(s)) equals render_view(img, s).
        resave_jpeg: re-encode the source as JPEG at PIL's default quality
            first, as validators do with real (JPEG) images; leave it off for
            synthetic PNGs.
        level_probs: odds of levels 0-3 when the seed draws the level.
    """
    rgb = source_rgb(image, resave_jpeg)
    rng = _view_rng(seed)
    drawn = _draw_level(rng, level_probs)
    chosen = drawn if level is None else _check_level(level)
    pipeline = build_pipeline(chosen, rgb.shape[0], rgb.shape[1])
    # One shared generator: A.Compose(seed=...) would hand each transform its own copy of
    # the same stream, and the on/off draws of the distortions would all agree.
    pipeline.set_random_state(rng, random.Random(int(rng.integers(2**63))))
    distorted = pipeline(image=rgb)["image"]
    jpeg = encode_jpeg(distorted)
    return View(image=decode_jpeg(jpeg), jpeg=jpeg, level=chosen)


def augment_view(
    image: ImageLike,
    seed: int,
    level: int | None = None,
    *,
    resave_jpeg: bool = False,
) -> np.ndarray:
    """The (224, 224, 3) uint8 RGB array a miner decodes for this view.

    Args:
        image: the source image, as for render_view.
        seed: the view seed.
        level: force a level 0-3 (None: drawn from the seed with equal odds).
        resave_jpeg: re-encode the source at JPEG quality 75 first (real images).
    """
    return render_view(image, seed, level, resave_jpeg=resave_jpeg).image


def view_level(seed: int, level_probs: Sequence[float] = LEVEL_PROBS) -> int:
    """The level a view seed draws, without rendering anything.

    Args:
        seed: the view seed.
        level_probs: odds of levels 0-3.
    """
    return _draw_level(_view_rng(seed), level_probs)


def view_seeds(image_sha256: str, k: int, salt: str = "holdout") -> list[int]:
    """Fixed view seeds for one image: the same k seeds on every run and machine.

    Args:
        image_sha256: hex digest of the source image bytes.
        k: how many seeds.
        salt: separates seed families (holdout, calibration, ...).
    """
    if k < 0:
        raise ValueError("k must be non-negative")
    seeds = []
    for i in range(k):
        digest = hashlib.sha256(f"{salt}\x00{image_sha256}\x00{i}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "big") >> 1)
    return seeds


def encode_jpeg(rgb: np.ndarray) -> bytes:
    """Encode uint8 RGB exactly as the validator does: PIL, format JPEG, no options.

    Args:
        rgb: (H, W, 3) uint8.
    """
    buf = io.BytesIO()
    # No quality or subsampling argument, like natix/protocol.py: PIL's defaults are q75, 4:2:0.
    Image.fromarray(rgb).save(buf, format="JPEG")
    return buf.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode image bytes to uint8 RGB with PIL, as the miner does.

    Args:
        data: encoded image bytes.
    """
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def source_rgb(image: ImageLike, resave_jpeg: bool) -> np.ndarray:
    """The image as the validator's distortions start from it: RGB uint8, re-saved as JPEG first
    when asked. render_view(source_rgb(im, True), s) equals render_view(im, s, resave_jpeg=True)."""
    if isinstance(image, Image.Image):
        if resave_jpeg:
            im = image if image.mode in _JPEG_MODES else image.convert("RGB")
            buf = io.BytesIO()
            im.save(buf, format="JPEG")
            return decode_jpeg(buf.getvalue())
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"image must be uint8 RGB (H, W, 3) or grey (H, W), got {array.dtype} {array.shape}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if resave_jpeg:
        return decode_jpeg(encode_jpeg(np.ascontiguousarray(array)))
    return np.ascontiguousarray(array)


def _view_rng(seed: int) -> np.random.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return np.random.default_rng(int(seed))


def _draw_level(rng: np.random.Generator, level_probs: Sequence[float]) -> int:
    probs = np.asarray(level_probs, dtype=np.float64)
    if probs.shape != (len(LEVELS),) or (probs < 0).any() or not math.isclose(probs.sum(), 1.0, rel_tol=1e-9):
        raise ValueError("level_probs must be 4 non-negative odds summing to 1")
    return int(rng.choice(len(LEVELS), p=probs))


def _check_level(level: int) -> int:
    if level not in LEVELS:
        raise ValueError(f"level must be 0, 1, 2 or 3, got {level!r}")
    return level


def _center_square(height: int, width: int) -> tuple[int, int, int, int]:
    # torchvision's CenterCrop offsets: Python round(), so halves go to the even side.
    side = min(height, width)
    top = round((height - side) / 2.0)
    left = round((width - side) / 2.0)
    return left, top, left + side, top + side


def _off_or(choices: list[A.BasicTransform]) -> A.OneOf:
    # OneOf weighs its children by their p: all 1, so off and each strength are equally likely.
    return A.OneOf([A.NoOp(p=1.0), *choices], p=1.0)


def _contrast(factor: float) -> A.RandomBrightnessContrast:
    # alpha = 1 + contrast, beta = 0: a float32 multiply truncated to uint8, as the validator does.
    limit = (factor - 1.0, factor - 1.0)
    return A.RandomBrightnessContrast(brightness_limit=(0.0, 0.0), contrast_limit=limit, ensure_safe_range=False, p=1)


def _downscale(side: int) -> A.Downscale:
    # A scale of side/224 makes cv2 pick exactly `side` pixels and the same coordinate map as
    # the validator's explicit size.
    linear = {"downscale": cv2.INTER_LINEAR, "upscale": cv2.INTER_LINEAR}
    return A.Downscale(scale_range=(side / SIZE, side / SIZE), interpolation_pair=linear, p=1.0)


def _truncate(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.clip(values, 0, 255).astype(np.uint8))
