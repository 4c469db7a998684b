"""`svd demo-data DIR`: generated street scenes in the layout of NATIX's roadwork dataset.

Writes what `natix-network-org/roadwork` holds on the Hugging Face hub, so the
learning loop can be run and tested end to end without it:

- `DIR/data/train-00000-of-0000N.parquet`: one row per image; `image` is a
  struct {bytes: binary, path: string} (the `datasets` Image feature, declared
  in the file's `huggingface` schema metadata so `datasets` decodes it),
  `label` int64 (1 roadwork, 0 none), `scene_description` string (a sentence
  for label 1; empty, or null for about a third, for label 0), and metadata
  columns `id`, `width`, `height`, `city_name` as the CMU ROADWork data on the
  hub has them (the real set's other metadata columns are not confirmed; the
  validator reads only image, label and description). Images are JPEGs at
  the native sizes today's validators send (protocol.md): dashcam frames of
  1280x720 and 1920x1080, 1600x1200, and phone-like photos, portrait
  (1080x1920, 1512x2016) as well as landscape (2016x1512).
- A small share of rows (`disagree_share`, default 2%) deliberately has a
  description that disagrees with its label (label 1 with an empty
  description, label 0 with one), the rows the validator's skip rule is
  there for: validators skip them and so does `svd.train.sources`. What
  their image shows does not matter.
- A share of the images (`synthetic_share`, a third by default, as in
  today's challenges) go to an image folder,
  `DIR/synthetic/<0|1>/synthetic-NNNNNN.png`, PNG 1024x1024 like the
  validator's SDXL text-to-image output: a source of its own
  (`synthetic = true`), reported apart from the photos.

The roadwork class carries a signal a random-weight backbone keeps through the
validator's distortions (see svd.train.demo_scenes): figures learned on this
data prove the loop's mechanics, not accuracy. Every image depends only on
(seed, stream, index), so a given seed always gives the same files.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import structlog

from svd.train.demo_scenes import render
from svd.train.sources import disagreement

if TYPE_CHECKING:
    import pyarrow as pa

    from svd.config import Config

log = structlog.get_logger(__name__)
T = TypeVar("T")

# Native sizes: dashcam frames, a 4:3 camera, phone photos (portrait and landscape).
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (1280, 720), (1920, 1080), (1600, 1200), (1080, 1920), (1512, 2016), (2016, 1512),
)  # fmt: skip
SIZE_ODDS = (0.3, 0.3, 0.1, 0.1, 0.1, 0.1)
# Today's challenges: a third real photos, a third synthetic, a third photos from NATIX's task service.
SYNTHETIC_SHARE = 1 / 3
SYNTHETIC_SIZE = 1024
DISAGREE_SHARE = 0.02
POSITIVE_SHARE = 0.5
# Label-0 descriptions written as null rather than "" (the validator treats both as empty).
NULL_DESCRIPTION_SHARE = 1 / 3
SHARD_ROWS = 500
ROW_GROUP_ROWS = 100
JPEG_QUALITY = 90
# Independent random streams per seed: parquet rows and synthetic images never share a scene.
PARQUET_STREAM = 0
SYNTHETIC_STREAM = 1
CITIES = ("pittsburgh", "berlin", "munich", "lisbon", "warsaw", "austin", "toronto", "lyon")
STREETS = ("Urban street", "Two-lane road", "City avenue", "Residential street", "Arterial road")
# The columns beside `image`, named as DemoRow's fields, with their `datasets` dtypes.
VALUE_COLUMNS = (
    ("label", "int64"), ("scene_description", "string"), ("id", "int64"), ("width", "int64"), ("height", "int64"),
    ("city_name", "string"),
)  # fmt: skip
FEATURES = {"image": {"_type": "Image"}, **{n: {"dtype": t, "_type": "Value"} for n, t in VALUE_COLUMNS}}


@dataclass(frozen=True)
class DemoRow:
    """One generated row: the encoded image and the columns written beside it."""

    id: int
    label: int
    scene_description: str | None
    image: bytes
    path: str
    width: int
    height: int
    city_name: str

    @property
    def disagrees(self) -> bool:
        """The validator's skip rule: a description with label 0, or none with label 1."""
        return disagreement(self.label, self.scene_description) is not None


@dataclass
class DemoSummary:
    """What a run wrote: files, rows per label, rows that disagree, synthetic images per label."""

    files: list[Path] = field(default_factory=list)
    labels: Counter[int] = field(default_factory=Counter)
    disagreeing: int = 0
    synthetic: Counter[int] = field(default_factory=Counter)

    @property
    def rows(self) -> int:
        return sum(self.labels.values())


def scene_image(rng: np.random.Generator, label: int, size: tuple[int, int], fmt: str) -> tuple[bytes, list[str]]:
    """One scene encoded as JPEG (quality JPEG_QUALITY) or PNG; returns the bytes and the gear drawn."""
    im, gear, _ = render(rng, size[0], size[1], roadwork=label == 1)
    buf = io.BytesIO()
    if fmt == "PNG":
        im.save(buf, format="PNG", compress_level=1)
    else:
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), gear


def describe(rng: np.random.Generator, gear: Sequence[str]) -> str:
    """A scene description in the style of the real set's ("Two-lane road with ... and ...")."""
    street = STREETS[int(rng.integers(len(STREETS)))]
    parts = list(gear) or ["traffic cones along the lane"]
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"{street} with {listed}."


def demo_row(
    index: int,
    seed: int,
    positive_share: float = POSITIVE_SHARE,
    disagree_share: float = DISAGREE_SHARE,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    size_odds: Sequence[float] = SIZE_ODDS,
) -> DemoRow:
    """Row `index` of the parquet stream for `seed`; see demo_rows()."""
    rng = np.random.default_rng([seed, PARQUET_STREAM, index])
    label = int(rng.random() < positive_share)
    disagree = bool(rng.random() < disagree_share)
    width, height = sizes[int(rng.choice(len(sizes), p=size_odds))]
    city = CITIES[int(rng.integers(len(CITIES)))]
    data, gear = scene_image(rng, label, (width, height), "JPEG")
    description: str | None = describe(rng, gear) if label == 1 else ""
    if disagree:
        description = "" if label == 1 else describe(rng, [])
    elif label == 0 and rng.random() < NULL_DESCRIPTION_SHARE:
        description = None
    return DemoRow(index, label, description, data, f"{city}_{index:06d}.jpg", width, height, city)


def demo_rows(
    count: int,
    seed: int = 0,
    *,
    start: int = 0,
    positive_share: float = POSITIVE_SHARE,
    disagree_share: float = DISAGREE_SHARE,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    size_odds: Sequence[float] | None = None,
    workers: int = 1,
) -> Iterator[DemoRow]:
    """Rows start .. start+count-1 of the parquet stream for `seed`, in order.

    Args:
        count: rows to yield.
        seed: the data set's seed; row i is the same whatever count, start and workers are.
        start: index of the first row (shards continue where the last one ended).
        positive_share: odds that a row is roadwork (label 1).
        disagree_share: odds that a row's description disagrees with its label.
        sizes: frame sizes (width, height) to draw from.
        size_odds: odds of each size; default SIZE_ODDS for DEFAULT_SIZES, else uniform.
        workers: processes drawing rows (1: this one).
    """
    odds = tuple(float(p) for p in _size_odds(sizes, size_odds))
    make = partial(demo_row, seed=seed, positive_share=positive_share, disagree_share=disagree_share,
                   sizes=tuple(sizes), size_odds=odds)  # fmt: skip
    yield from _mapped(make, range(start, start + count), workers)


def _mapped(fn: Callable[[int], T], indices: range, workers: int) -> Iterator[T]:
    """fn over indices, in order, in `workers` processes (1: here)."""
    if workers <= 1:
        yield from map(fn, indices)
        return
    # spawn, not fork: the caller may hold threads (a logger's, torch's) that fork would copy mid-state.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        chunk = 32 * workers  # results in flight at once, so memory stays bounded for any count
        for k in range(0, len(indices), chunk):
            yield from pool.map(fn, indices[k : k + chunk], chunksize=4)


def _size_odds(sizes: Sequence[tuple[int, int]], odds: Sequence[float] | None) -> np.ndarray:
    if odds is None:
        odds = SIZE_ODDS if tuple(sizes) == DEFAULT_SIZES else [1.0] * len(sizes)
    p = np.asarray(odds, dtype=np.float64)
    if len(sizes) == 0 or p.shape != (len(sizes),) or (p < 0).any() or p.sum() <= 0:
        raise ValueError("sizes must be non-empty, with one non-negative odd each")
    return p / p.sum()


def _table(rows: Sequence[DemoRow]) -> pa.Table:
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [("image", image)] + [(n, pa.int64() if t == "int64" else pa.string()) for n, t in VALUE_COLUMNS]
    schema = pa.schema(fields, metadata={"huggingface": json.dumps({"info": {"features": FEATURES}})})
    columns = {"image": [{"bytes": r.image, "path": r.path} for r in rows]}
    columns.update({n: [getattr(r, n) for r in rows] for n, _ in VALUE_COLUMNS})
    return pa.Table.from_pydict(columns, schema=schema)


def write_parquet(
    out_dir: Path,
    count: int,
    seed: int = 0,
    *,
    shard_rows: int = SHARD_ROWS,
    split: str = "train",
    positive_share: float = POSITIVE_SHARE,
    disagree_share: float = DISAGREE_SHARE,
    sizes: Sequence[tuple[int, int]] = DEFAULT_SIZES,
    workers: int = 1,
    summary: DemoSummary | None = None,
) -> DemoSummary:
    """Writes `count` rows as out_dir/data/<split>-0000k-of-0000N.parquet, shard_rows rows per file.

    Args:
        out_dir: the data set's root; data/ is created in it.
        count: rows in all.
        seed: see demo_rows().
        shard_rows: rows per parquet file.
        split: the split name in the file names.
        positive_share, disagree_share, sizes, workers: see demo_rows().
        summary: add to this summary instead of a new one.
    """
    import pyarrow.parquet as pq

    if count < 0 or shard_rows < 1:
        raise ValueError("count must be >= 0 and shard_rows >= 1")
    summary = summary or DemoSummary()
    shards = max(1, math.ceil(count / shard_rows))
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    stream = demo_rows(
        count, seed, positive_share=positive_share, disagree_share=disagree_share, sizes=sizes, workers=workers
    )
    for k in range(shards):
        rows = list(itertools.islice(stream, shard_rows))
        path = out_dir / "data" / f"{split}-{k:05d}-of-{shards:05d}.parquet"
        pq.write_table(_table(rows), path, row_group_size=ROW_GROUP_ROWS)
        summary.files.append(path)
        summary.labels.update(r.label for r in rows)
        summary.disagreeing += sum(r.disagrees for r in rows)
    return summary


def write_synthetic(
    out_dir: Path,
    count: int,
    seed: int = 0,
    *,
    positive_share: float = POSITIVE_SHARE,
    side: int = SYNTHETIC_SIZE,
    workers: int = 1,
    summary: DemoSummary | None = None,
) -> DemoSummary:
    """Writes `count` PNG scenes (side x side) to out_dir/synthetic/<label>/synthetic-NNNNNN.png.

    Args:
        out_dir: the data set's root; synthetic/0 and synthetic/1 are created in it.
        count: images in all.
        seed: the data set's seed (a stream of its own, apart from the parquet rows').
        positive_share: odds that an image is roadwork.
        side: the square images' side in pixels.
        workers: processes drawing images (1: this one).
        summary: add to this summary instead of a new one.
    """
    summary = summary or DemoSummary()
    for label in (0, 1):
        (out_dir / "synthetic" / str(label)).mkdir(parents=True, exist_ok=True)
    make = partial(synthetic_image, seed=seed, positive_share=positive_share, side=side)
    for index, (label, data) in enumerate(_mapped(make, range(count), workers)):
        (out_dir / "synthetic" / str(label) / f"synthetic-{index:06d}.png").write_bytes(data)
        summary.synthetic[label] += 1
    return summary


def synthetic_image(index: int, seed: int, positive_share: float, side: int) -> tuple[int, bytes]:
    """Image `index` of the synthetic stream for `seed`: its label and PNG bytes."""
    rng = np.random.default_rng([seed, SYNTHETIC_STREAM, index])
    label = int(rng.random() < positive_share)
    return label, scene_image(rng, label, (side, side), "PNG")[0]


def write_demo_data(
    out_dir: Path,
    count: int,
    seed: int = 0,
    *,
    synthetic_share: float = SYNTHETIC_SHARE,
    shard_rows: int = SHARD_ROWS,
    positive_share: float = POSITIVE_SHARE,
    disagree_share: float = DISAGREE_SHARE,
    workers: int = 1,
) -> DemoSummary:
    """The whole demo set: round(count * synthetic_share) synthetic PNGs, the rest parquet rows.

    Args:
        out_dir: the data set's root.
        count: images in all.
        seed: fixes every image and label.
        synthetic_share: share of count written as synthetic PNGs (0 to 1).
        shard_rows: parquet rows per file.
        positive_share: odds of roadwork, in both parts.
        disagree_share: odds that a parquet row's description disagrees with its label.
        workers: processes drawing images; the files do not depend on it.
    """
    if not 0.0 <= synthetic_share <= 1.0:
        raise ValueError("synthetic_share must be in [0, 1]")
    synthetic = round(count * synthetic_share)
    summary = write_parquet(
        out_dir,
        count - synthetic,
        seed,
        shard_rows=shard_rows,
        positive_share=positive_share,
        disagree_share=disagree_share,
        workers=workers,
    )
    if synthetic:
        write_synthetic(out_dir, synthetic, seed, positive_share=positive_share, workers=workers, summary=summary)
    log.info(
        "demo_data_written",
        path=str(out_dir),
        rows=summary.rows,
        roadwork=summary.labels[1],
        disagreeing=summary.disagreeing,
        synthetic=sum(summary.synthetic.values()),
        files=len(summary.files),
    )
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", type=Path, help="output folder (data/*.parquet, synthetic/<0|1>/*.png)")
    p.add_argument("--count", type=int, default=2000, help="images in all (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="the same seed always gives the same files")
    p.add_argument(
        "--synthetic-share",
        type=float,
        default=SYNTHETIC_SHARE,
        help="share written as 1024x1024 PNGs in synthetic/ (default 1/3, as validators draw them)",
    )
    p.add_argument("--shard-rows", type=int, default=SHARD_ROWS, help=f"rows per parquet file (default {SHARD_ROWS})")
    p.add_argument("--positive-share", type=float, default=POSITIVE_SHARE, help="share of roadwork images")
    p.add_argument(
        "--disagree-share",
        type=float,
        default=DISAGREE_SHARE,
        help=f"share of rows whose description disagrees with the label (skipped on read; default {DISAGREE_SHARE})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="processes drawing images (default: CPUs, <= 8)",
    )
    p.set_defaults(func=run_demo_data)


def run_demo_data(args: argparse.Namespace, cfg: Config) -> int:
    """Writes the demo set to args.dir and prints what was written; cfg is not used."""
    if args.count < 0 or args.shard_rows < 1:
        print("svd demo-data: --count must be >= 0 and --shard-rows >= 1", file=sys.stderr)
        return 2
    for name in ("synthetic_share", "positive_share", "disagree_share"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            print(f"svd demo-data: --{name.replace('_', '-')} must be between 0 and 1", file=sys.stderr)
            return 2
    summary = write_demo_data(
        args.dir,
        args.count,
        args.seed,
        synthetic_share=args.synthetic_share,
        shard_rows=args.shard_rows,
        positive_share=args.positive_share,
        disagree_share=args.disagree_share,
        workers=args.workers,
    )
    print(
        f"{summary.rows} parquet rows ({summary.labels[1]} roadwork, {summary.disagreeing} with a description "
        f"that disagrees with the label) in {len(summary.files)} files under {args.dir / 'data'}"
    )
    sources = f'[[train.sources]]\nkind = "natix_parquet"\npath = "{args.dir}"\n'
    if summary.synthetic:
        made = sum(summary.synthetic.values())
        print(f"{made} synthetic PNGs ({summary.synthetic[1]} roadwork) under {args.dir / 'synthetic'}")
        sources += f'\n[[train.sources]]\nkind = "image_folder"\npath = "{args.dir / "synthetic"}"\nsynthetic = true\n'
    print(f"\nTo train on it (then `svd reload` a running daemon), add to config.toml:\n\n{sources}")
    return 0
