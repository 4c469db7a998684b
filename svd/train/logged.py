"""Logged samples as a training source: reviewed labels and testnet labels from samples.db.

Every such sample is an image exactly as a validator sent it (already
distorted), so it is used as served, one view, with no further
augmentation; and the features the serving engine computed while answering
it are stored beside it, so when the serving backbone is still the one that
answered, training needs no second pass over it. The label is the human
review when there is one, else the testnet's ground truth (svd.samples.db
LABEL_SQL). An image logged more than once counts once (its newest label).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from svd.samples.db import LABEL_SQL, DatabaseError, connect_readonly
from svd.train.sources import SCANNERS, Record, SourceError, SourceScan, SourceSpec

SAMPLES = "samples"  # the source kind
SERVED = "served"  # the origin of a logged image: as a validator sent it


@dataclass(frozen=True)
class SampleRef:
    """An image in samples.db, by hash."""

    db: Path
    sha256: str

    def read(self) -> bytes:
        conn = connect_readonly(self.db)
        try:
            row = conn.execute("SELECT data FROM images WHERE sha256 = ?", (self.sha256,)).fetchone()
        finally:
            conn.close()
        if row is None:
            raise SourceError(f"{self.db}: image {self.sha256[:12]} is gone (retention deleted it)")
        return bytes(row[0])


@dataclass(frozen=True)
class LoggedRecord(Record):
    """A Record whose features, when set, came from the engine with this backbone."""

    backbone_sha256: str = field(default="", compare=False)


def scan_samples(spec: SourceSpec, hub_cache: Path | None = None) -> SourceScan:
    """Labelled samples of the database at spec.path, newest label per image.

    Raises:
        SourceError: no database there, or one this svd cannot read.
    """
    del hub_cache  # a local file; the hub has nothing to do with it
    if spec.path is None:
        raise SourceError(f"source {spec.name}: a samples source needs the database path")
    try:
        conn = connect_readonly(spec.path)
    except DatabaseError as exc:
        raise SourceError(f"source {spec.name}: {exc}") from exc
    scan = SourceScan(spec)
    try:
        rows = conn.execute(
            f"SELECT image_sha256, {LABEL_SQL}, features, feature_dim, backbone_sha256 FROM samples"
            f" WHERE {LABEL_SQL} IS NOT NULL ORDER BY received_at DESC, id DESC"
        ).fetchall()
    except sqlite3.Error as exc:
        raise SourceError(f"source {spec.name}: {spec.path}: {exc}") from exc
    finally:
        conn.close()
    seen: set[str] = set()
    for sha, label, blob, dim, backbone in rows:
        scan.rows += 1
        if sha in seen:
            scan.skipped["older_label_of_the_same_image"] += 1
            continue
        if label not in (0, 1):
            scan.skipped["bad_label"] += 1
            continue
        seen.add(sha)
        features = np.frombuffer(blob, dtype="<f4") if blob and len(blob) == 4 * dim else None
        ref = SampleRef(spec.path, sha)
        scan.records.append(LoggedRecord(sha, int(label), spec.name, SERVED, ref, features, backbone or ""))
    return scan


SCANNERS[SAMPLES] = scan_samples  # a source kind of its own, registered where its scanner lives
