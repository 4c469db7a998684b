"""Canary images: fixed, seeded inputs that every process and run regenerates identically.

Three users: the parity gates (a TensorRT plan and an ONNX graph against torch
FP32), the check a new engine passes before it serves (hot swap and start-up),
and benchmarks that need street-like JPEGs without a data set. Structured
images (street scenes, gradients, checkerboards, colour blocks) sit beside
uniform noise: noise alone drives a ViT into one corner of its feature space,
where a broken graph can still agree with the reference.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from svd.engine.manifest import SERVED_INPUT

# Seed of the parity gates' canaries (plan.py and build.py).
PARITY_SEED = 1234
# Canary image kinds, cycled through a batch; a batch of 1 is a street scene.
CANARY_KINDS = ("scene", "noise", "gradient", "checkerboard", "blocks")
SERVED_SHAPE = (SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)


def street_jpegs(n: int, seed: int = 0, size: tuple[int, int] = (224, 224)) -> list[bytes]:
    """Synthetic street-ish scenes as JPEG (PIL's default quality 75, like validators), 224x224 or
    (width, height): drawn at 224, resized, with sensor-like noise at full size (so the JPEG is as
    large as a photo's, ~0.25 bytes per pixel)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        im = Image.new("RGB", (224, 224), tuple(int(c) for c in rng.integers(90, 200, 3)))
        draw = ImageDraw.Draw(im)
        draw.rectangle((0, 140, 224, 224), fill=tuple(int(c) for c in rng.integers(40, 90, 3)))  # road
        for _ in range(int(rng.integers(3, 9))):
            x, y = (int(v) for v in rng.integers(0, 200, 2))
            colour = (
                (255, int(rng.integers(80, 160)), 0)
                if rng.random() < 0.5
                else tuple(int(c) for c in rng.integers(0, 255, 3))
            )
            draw.polygon([(x, y + 30), (x + 12, y), (x + 24, y + 30)], fill=colour)  # cones and clutter
        noise: np.ndarray
        if size == (224, 224):
            noise = rng.normal(0, 8, (224, 224, 3))
        else:  # a tile of noise repeated: as costly to compress as fresh noise, far cheaper to draw
            im = im.resize(size, Image.Resampling.BILINEAR)
            tile = rng.normal(0, 8, (256, 256, 3)).astype(np.float32)
            noise = np.tile(tile, (-(-size[1] // 256), -(-size[0] // 256), 1))[: size[1], : size[0]]
        arr = np.clip(np.asarray(im, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


def canary_images(batch_size: int, seed: int = PARITY_SEED) -> np.ndarray:
    """Seeded uint8 (N, 224, 224, 3) images cycling through CANARY_KINDS; the caller's own copy."""
    return _canaries(batch_size, seed).copy()


@lru_cache(maxsize=16)
def _canaries(batch_size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + batch_size)
    h, w, c = SERVED_SHAPE
    kinds = [CANARY_KINDS[i % len(CANARY_KINDS)] for i in range(batch_size)]
    scenes = iter(_decoded_scenes(kinds.count("scene"), seed + batch_size))
    out = np.empty((batch_size, h, w, c), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i, kind in enumerate(kinds):
        if kind == "scene":
            out[i] = next(scenes)
        elif kind == "noise":
            out[i] = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        elif kind == "gradient":
            slope = rng.uniform(-255, 255, (2, c))
            ramp = yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.uniform(0, 255, c)
            out[i] = np.clip(ramp, 0, 255).astype(np.uint8)
        elif kind == "checkerboard":
            cell = int(rng.integers(4, 57))
            dark, light = rng.integers(0, 256, (2, c))
            board = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(bool)
            out[i] = np.where(board[..., None], light, dark).astype(np.uint8)
        else:  # colour blocks on a k x k grid
            k = int(rng.choice((2, 4, 7, 8, 14)))
            blocks = rng.integers(0, 256, (k, k, c), dtype=np.uint8)
            out[i] = np.repeat(np.repeat(blocks, -(-h // k), axis=0)[:h], -(-w // k), axis=1)[:, :w]
    out.flags.writeable = False  # the cached original; callers get copies
    return out


def _decoded_scenes(n: int, seed: int) -> list[np.ndarray]:
    from PIL import Image

    scenes = []
    for jpeg in street_jpegs(n, seed=seed):
        with Image.open(io.BytesIO(jpeg)) as im:
            rgb = im.convert("RGB").resize((SERVED_INPUT.width, SERVED_INPUT.height))
        scenes.append(np.asarray(rgb, dtype=np.uint8))
    return scenes
