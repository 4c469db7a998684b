"""Training views: what a validator of a given generation sends for an image, as the engine sees it.

A view is (image, view seed, recipe). The recipe names everything that makes
its pixels, so the feature cache keys views by it and a changed setting
re-extracts only the views that no longer match:

- `current` (today's validators, protocol.md "The validator of today"): the
  image at its native size, un-distorted, re-saved as JPEG 75; a JPEG source
  is compressed twice (the validator's cache writes it at quality 75 before
  the challenge re-saves it), a synthetic PNG once. Nothing is random, so an
  image has one current view (seed 0).
- `v0.2` (January's validators): distortion levels 0-3 at 224x224, drawn from
  the view seed (svd.train.augment).
- as served (logged samples): the image exactly as a validator sent it.

Whatever the generation, the JPEG a validator would send then goes through
the serving engine's own mapping (svd.engine.preprocess.map_bytes), the very
function serving decodes queries with, so training sees the pixels the
engine is fed. With a mix ("current:3, v0.2:1") each view seed draws its
generation; the current draws of an image share its one view, and count as
often as they were drawn.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from svd.engine.preprocess import SIZE, Preprocess, map_bytes
from svd.train.augment import AUGMENT_VERSION, encode_jpeg, render_view, source_rgb, view_seeds
from svd.train.logged import SERVED
from svd.train.sources import Record, read_images

CURRENT, V02 = "current", "v0.2"
AS_SERVED = -1  # the view seed of an image used as received (logged samples)
CURRENT_SEED = 0  # the one view seed of an image in the current generation
# Independent of the view's own draws (levels, crops): which generation a seed renders.
_GENERATION_STREAM = 0x6E

Mix = Sequence[tuple[str, float]]


@dataclass(frozen=True, slots=True)
class ViewKey:
    record: Record
    seed: int
    recipe: str

    @property
    def key(self) -> tuple[str, int, str]:
        return self.record.sha256, self.seed, self.recipe


def recipe(generation: str, p: Preprocess) -> str:
    """The cache key of a view's pixels, short of the image and seed."""
    if generation == V02:
        return f"{V02}/aug{AUGMENT_VERSION}/{p.key}"
    return f"{generation}/{p.key}"


def draw_generation(seed: int, mix: Mix) -> str:
    """The generation a view seed renders, fixed by the seed."""
    if len(mix) == 1:
        return mix[0][0]
    u = np.random.default_rng([seed, _GENERATION_STREAM]).random()
    total = 0.0
    for generation, share in mix:
        total += share
        if u < total:
            return generation
    return mix[-1][0]


def plan_views(records: Sequence[Record], views: int, salt: str, mix: Mix, p: Preprocess) -> list[ViewKey]:
    """The views of each record occurrence: `views` seeds, each rendered in the generation it draws.

    A record drawn twice (an up-weighted source) gets new seeds. Records carrying served
    features (logged samples) get their one as-served view instead. Only current views:
    one per occurrence (they would all be the same).
    """
    seen: Counter[str] = Counter()
    out = []
    current_only = [g for g, _ in mix] == [CURRENT]
    for record in records:
        if record.origin == SERVED:
            out.append(ViewKey(record, AS_SERVED, recipe(SERVED, p)))
            continue
        if current_only:
            out.append(ViewKey(record, CURRENT_SEED, recipe(CURRENT, p)))
            continue
        n = seen[record.sha256]
        seen[record.sha256] += 1
        for seed in view_seeds(record.sha256, views * (n + 1), salt)[views * n :]:
            generation = draw_generation(seed, mix)
            view_seed = CURRENT_SEED if generation == CURRENT else seed
            out.append(ViewKey(record, view_seed, recipe(generation, p)))
    return out


def validator_jpeg(data: bytes) -> bytes:
    """The JPEG today's validator sends for a source image: RGB at its native size, re-saved at
    quality 75; a JPEG source twice (its cache's copy, then the challenge)."""
    return encode_jpeg(validator_source(data))


def validator_source(data: bytes) -> np.ndarray:
    """The image as a validator's cache holds it, RGB: a JPEG source re-saved at quality 75, a PNG as is.
    Both generations start from it (read-only: an image's views share it)."""
    with Image.open(io.BytesIO(data)) as im:
        was_jpeg = im.format == "JPEG"
        rgb = np.asarray(im.convert("RGB"))
    source = source_rgb(rgb, resave_jpeg=was_jpeg)
    source.flags.writeable = False
    return source


def render_views(views: Sequence[ViewKey], p: Preprocess) -> np.ndarray:
    """uint8 (N, 224, 224, 3): each view as the engine sees a validator's query (CPU; the training pool)."""
    # Each image is read, decoded and re-saved once, however many of its views the chunk holds.
    refs = {v.record.sha256: v.record.ref for v in views}
    blobs = dict(zip(refs, read_images(list(refs.values())), strict=True))
    out = np.empty((len(views), SIZE, SIZE, 3), dtype=np.uint8)
    sources: dict[str, np.ndarray] = {}
    sent: dict[str, bytes] = {}
    for i, view in enumerate(views):
        sha = view.record.sha256
        if view.seed == AS_SERVED:
            out[i] = map_bytes(blobs[sha], p)
            continue
        if sha not in sources:
            sources[sha] = validator_source(blobs[sha])
        if view.recipe.startswith(CURRENT):
            if sha not in sent:
                sent[sha] = encode_jpeg(sources[sha])
            out[i] = map_bytes(sent[sha], p)
        else:
            out[i] = map_bytes(render_view(sources[sha], view.seed).jpeg, p)
    return out
