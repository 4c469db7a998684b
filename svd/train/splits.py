"""Splits and mixes training records: deduplicated, split by image hash, weighted by source.

Splits are chosen by image hash, so an image keeps its split whatever else is
added or removed: the holdout is the images whose keyed hash falls below
`holdout_permille` of 1000, validation those of the rest below
`validation_permille` under another key, and training everything else. The
holdout is never trained on. An image whose hash was seen in an earlier
source (or earlier in the same one) is dropped and counted as a duplicate:
the first source listed wins.

Weights mix the training set: one epoch has `epoch_size` examples (default:
as many as the training images of all sources with weight > 0) and source s
contributes round(epoch_size * w_s / sum of weights) of them. A source with
fewer images than its share is repeated (every image the same number of
times, give or take one); a larger one is subsampled without repeats.
Weight 0 keeps a source out of training but in the holdout and validation.
Validation and holdout are not weighted: every image in them counts once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from svd.train.sources import Record, SourceError, SourceSpec, scan_source

log = structlog.get_logger(__name__)

HOLDOUT_KEY = b"svd-holdout-v1"
VALIDATION_KEY = b"svd-validation-v1"
HOLDOUT, VALIDATION, TRAIN = "holdout", "validation", "train"
SPLITS = (TRAIN, VALIDATION, HOLDOUT)


def split_of(sha256: str, holdout_permille: int, validation_permille: int) -> str:
    """HOLDOUT, VALIDATION or TRAIN for an image hash; depends on nothing but the hash and the two figures."""
    if _bucket(sha256, HOLDOUT_KEY) < holdout_permille:
        return HOLDOUT
    if _bucket(sha256, VALIDATION_KEY) < validation_permille:
        return VALIDATION
    return TRAIN


def _bucket(sha256: str, key: bytes) -> int:
    digest = hashlib.blake2b(sha256.encode("ascii"), key=key, digest_size=8).digest()
    return int.from_bytes(digest, "big") % 1000


@dataclass(frozen=True)
class MixConfig:
    """How to split and mix. Permilles are of 1000; validation's of the images not in the holdout.

    Attributes:
        holdout_permille: images (by hash) kept for the final evaluation, never trained on.
        validation_permille: images (by another hash) for early stopping and calibration.
        epoch_size: training examples per epoch; None: the training images of the weighted sources.
        seed: seeds the epoch's draw.
    """

    holdout_permille: int = 100
    validation_permille: int = 100
    epoch_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not (0 <= self.holdout_permille <= 1000 and 0 <= self.validation_permille <= 1000):
            raise ValueError("holdout_permille and validation_permille must be within 0..1000")
        if self.epoch_size is not None and self.epoch_size < 0:
            raise ValueError("epoch_size must be >= 0")


@dataclass
class SourceReport:
    """Counts for one source, for the run report.

    rows: rows or files seen; skipped: by reason; duplicates: images seen before (in this source or
    an earlier one), of which conflicts had the other label there; labels: per split, images per
    label; drawn: examples in the epoch per label.
    """

    name: str
    kind: str
    origin: str
    location: str
    weight: float
    rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    conflicts: int = 0
    labels: dict[str, dict[int, int]] = field(default_factory=lambda: {s: {0: 0, 1: 0} for s in SPLITS})
    drawn: dict[int, int] = field(default_factory=lambda: {0: 0, 1: 0})

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "location": self.location,
            "weight": self.weight,
            "rows": self.rows,
            "skipped": dict(self.skipped),
            "duplicates": self.duplicates,
            "conflicts": self.conflicts,
            "labels": {s: {str(k): v for k, v in c.items()} for s, c in self.labels.items()},
            "drawn": {str(k): v for k, v in self.drawn.items()},
        }


@dataclass
class TrainingData:
    """The assembled splits.

    Attributes:
        train: one epoch drawn by weight (records of up-weighted sources may repeat).
        validation, holdout: every image of those splits once, in source order.
        pools: each source's training images (unique), what epochs are drawn from.
        weights: each source's weight.
        epoch_size: examples per epoch.
        sources: counts per source, in spec order.
    """

    train: list[Record]
    validation: list[Record]
    holdout: list[Record]
    pools: dict[str, list[Record]]
    weights: dict[str, float]
    epoch_size: int
    sources: list[SourceReport]

    def epoch(self, seed: int) -> list[Record]:
        """Another epoch drawn from the same pools with the same weights."""
        return draw_epoch(self.pools, self.weights, self.epoch_size, seed)

    def report(self) -> dict[str, Any]:
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "holdout": len(self.holdout),
            "epoch_size": self.epoch_size,
            "sources": [s.as_dict() for s in self.sources],
        }


def shares(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Splits `total` in proportion to the weights, rounding by largest remainder so the parts sum to total."""
    weight_sum = sum(weights.values())
    if weight_sum <= 0:
        return {name: 0 for name in weights}
    exact = {name: total * w / weight_sum for name, w in weights.items()}
    parts = {name: int(v) for name, v in exact.items()}
    by_remainder = sorted(exact, key=lambda n: (parts[n] - exact[n], n))
    for name in by_remainder[: total - sum(parts.values())]:
        parts[name] += 1
    return parts


def draw_epoch(
    pools: Mapping[str, Sequence[Record]], weights: Mapping[str, float], size: int, seed: int
) -> list[Record]:
    """`size` training examples, each source's share by weight, shuffled (see the module doc)."""
    rng = np.random.default_rng(seed)
    live = {name: weights[name] for name, pool in pools.items() if pool and weights.get(name, 0) > 0}
    out: list[Record] = []
    for name, n in shares(live, size).items():
        pool = pools[name]
        repeats, rest = divmod(n, len(pool))
        picks = np.concatenate([np.tile(np.arange(len(pool)), repeats), rng.permutation(len(pool))[:rest]])
        out.extend(pool[int(i)] for i in picks)
    return [out[int(i)] for i in rng.permutation(len(out))]


def assemble(specs: Sequence[SourceSpec], mix: MixConfig | None = None, hub_cache: Path | None = None) -> TrainingData:
    """Scans the sources in order, drops duplicate images, splits by hash and draws one epoch.

    Args:
        specs: the sources; names must be unique; on a duplicate image the earlier source wins.
        mix: split and mixing figures (default MixConfig()).
        hub_cache: the Hugging Face hub cache for repo_id sources (default: huggingface_hub's).

    Raises:
        SourceError: a source cannot be read, or two share a name.
        ValueError: an unknown source kind.
    """
    mix = mix or MixConfig()
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise SourceError(f"source names must be unique, got {names}")
    seen: dict[str, int] = {}  # image hash -> the label it was first seen with
    splits: dict[str, list[Record]] = {s: [] for s in SPLITS}
    pools: dict[str, list[Record]] = {}
    reports = []
    for spec in specs:
        scan = scan_source(spec, hub_cache)
        report = SourceReport(spec.name, spec.kind, spec.origin, spec.location, spec.weight, scan.rows)
        report.skipped = dict(scan.skipped)
        pools[spec.name] = []
        for record in _unique(scan.records, seen, report):
            split = split_of(record.sha256, mix.holdout_permille, mix.validation_permille)
            report.labels[split][record.label] += 1
            (pools[spec.name] if split == TRAIN else splits[split]).append(record)
        reports.append(report)
        log.info(
            "source_scanned",
            source=spec.name,
            rows=scan.rows,
            skipped=dict(scan.skipped),
            duplicates=report.duplicates,
            conflicts=report.conflicts,
        )
    weights = {s.name: s.weight for s in specs}
    trained = sum(len(p) for name, p in pools.items() if weights[name] > 0)
    size = trained if mix.epoch_size is None else mix.epoch_size
    train = draw_epoch(pools, weights, size, mix.seed)
    by_name = {r.name: r for r in reports}
    for record in train:
        by_name[record.source].drawn[record.label] += 1
    return TrainingData(train, splits[VALIDATION], splits[HOLDOUT], pools, weights, size, reports)


def _unique(records: Iterable[Record], seen: dict[str, int], report: SourceReport) -> Iterator[Record]:
    for record in records:
        if record.sha256 in seen:
            report.duplicates += 1
            report.conflicts += seen[record.sha256] != record.label
            continue
        seen[record.sha256] = record.label
        yield record
