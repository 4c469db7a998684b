"""Human review of stored samples: `svd review export` to a FiftyOne dataset, `svd review import` back.

FiftyOne is an optional extra (pip install 'svd[review]'), imported only when a
review command runs, so the daemon and the core install never need it. The
dataset is the reviewer's workspace: export only adds samples to it and never
touches what a reviewer set there; import copies the reviewer's labels into
samples.db, which stays the one source of truth for training.
"""

from __future__ import annotations

import argparse
import datetime
import getpass
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from svd.samples.cli import positive_int
from svd.samples.db import IMAGE_SUFFIXES, LABEL_SQL, SHA256_RE, write_image_file

if TYPE_CHECKING:
    from svd.config import Config

DEFAULT_DATASET = "svd-review"
LABEL_FIELD = "ground_truth"
# The reviewer's label -> samples.review_label.
LABELS = {"roadwork": 1, "none": 0}
# Names listed in full in a report or an error; beyond this, a count.
MAX_LISTED = 10
INSTALL_HINT = "pip install 'svd[review]'"
# Image files for the App, under the state directory.
IMAGES_SUBDIR = Path("review") / "images"


class ReviewError(Exception):
    """Export or import cannot go on; the message names the sample, dataset or file."""


@dataclass
class ExportReport:
    added: int = 0
    images_written: int = 0
    already_in_dataset: int = 0
    # Still unlabelled in samples.db but beyond --limit this time.
    left_out: int = 0
    # svd_uid of samples whose image format the App cannot show (not exported).
    unknown_format: list[str] = field(default_factory=list)
    # svd_uid of samples whose image_sha256 is not a sha256 hex digest (not exported: it would name a file).
    bad_sha256: list[str] = field(default_factory=list)
    # svd_uid of dataset samples no longer in samples.db (retention deleted them).
    gone: list[str] = field(default_factory=list)
    pruned: int = 0


@dataclass
class ImportReport:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    # svd_uid of labelled dataset samples no longer in samples.db.
    missing: list[str] = field(default_factory=list)


def load_fiftyone() -> Any:
    """Import FiftyOne, or say in one line how to install it.

    Raises:
        ReviewError: the review extra is not installed (or broken).
    """
    try:
        import fiftyone
    except ImportError as e:
        raise ReviewError(f"FiftyOne is not available ({e}): {INSTALL_HINT}") from e
    return fiftyone


def uncertainty(prediction: float) -> float:
    """1 at p = 0.5, 0 at p = 0 or 1: sort descending in the App to see the hardest samples first."""
    return 1.0 - 2.0 * abs(prediction - 0.5)


def export_samples(
    conn: sqlite3.Connection,
    dataset_name: str,
    images_dir: Path,
    limit: int | None = None,
    prune: bool = False,
) -> ExportReport:
    """Add the unlabelled samples not yet in the dataset, most uncertain first.

    Samples already in the dataset, and any label a reviewer set on them, are
    left as they are. Dataset samples whose row retention deleted from
    samples.db are reported, and removed only with `prune`.

    Args:
        conn: samples.db (read only is enough).
        dataset_name: the FiftyOne dataset, created (persistent) if missing.
        images_dir: where image files are written once, named by content hash.
        limit: add at most this many new samples.
        prune: delete dataset samples that are gone from samples.db.

    Raises:
        ReviewError: the dataset exists but was not made by svd.
    """
    fo = load_fiftyone()
    dataset = _open_dataset(fo, dataset_name)
    report = ExportReport()
    in_dataset = set(dataset.values("svd_uid"))
    images_dir.mkdir(parents=True, exist_ok=True)
    new = []
    conn.execute("BEGIN")  # one snapshot of samples.db, whatever the daemon writes or retention deletes meanwhile
    try:
        in_db = {uid for (uid,) in conn.execute("SELECT uid FROM samples")}
        report.gone = sorted(in_dataset - in_db)
        for row in _new_unlabelled(conn, in_dataset, limit, report):
            uid, sha, fmt, prediction, engine, engine_version, source, received_at = row
            path = images_dir / f"{sha}{IMAGE_SUFFIXES[fmt.lower()]}"
            report.images_written += write_image_file(conn, sha, path)
            new.append(
                fo.Sample(
                    filepath=str(path),
                    svd_uid=uid,
                    prediction=float(prediction),
                    uncertainty=uncertainty(prediction),
                    engine=engine,
                    engine_version=engine_version,
                    source=source,
                    received_at=datetime.datetime.fromtimestamp(received_at, tz=datetime.UTC),
                )
            )
    finally:
        conn.execute("ROLLBACK")
    if prune and report.gone:
        dataset.delete_samples(dataset.match(fo.ViewField("svd_uid").is_in(report.gone)))
        report.pruned = len(report.gone)
    if new:
        dataset.add_samples(new, progress=False)
    report.added = len(new)
    return report


def _new_unlabelled(
    conn: sqlite3.Connection, in_dataset: set[str], limit: int | None, report: ExportReport
) -> list[tuple[Any, ...]]:
    """Unlabelled samples not in the dataset yet with an image the App can show, most uncertain first."""
    rows = conn.execute(
        "SELECT s.uid, s.image_sha256, i.format, s.prediction, s.engine, s.engine_version, s.source, s.received_at"
        " FROM samples s JOIN images i ON i.sha256 = s.image_sha256"
        f" WHERE {LABEL_SQL} IS NULL"
        " ORDER BY abs(s.prediction - 0.5), s.received_at, s.id"
    ).fetchall()
    todo = [row for row in rows if row[0] not in in_dataset]
    report.already_in_dataset = len(rows) - len(todo)
    report.bad_sha256 = [row[0] for row in todo if not SHA256_RE.match(row[1])]
    todo = [row for row in todo if SHA256_RE.match(row[1])]
    report.unknown_format = [row[0] for row in todo if row[2].lower() not in IMAGE_SUFFIXES]
    todo = [row for row in todo if row[2].lower() in IMAGE_SUFFIXES]
    if limit is not None:
        report.left_out = max(0, len(todo) - limit)
        todo = todo[:limit]
    return todo


def import_labels(conn: sqlite3.Connection, dataset_name: str, reviewer: str, now: float | None = None) -> ImportReport:
    """Copy every label set in the dataset into samples.db, all in one transaction.

    A label equal to the stored one is left alone (reviewed_at and reviewer
    keep their first values), so importing again changes nothing.

    Args:
        conn: samples.db, writable, in autocommit mode (as svd.db.connect opens it).
        dataset_name: the FiftyOne dataset export made.
        reviewer: stored with each new or changed label.
        now: reviewed_at for new or changed labels (default: the current time).

    Raises:
        ReviewError: no such dataset, or labels other than roadwork / none (all of them named).
    """
    fo = load_fiftyone()
    if not fo.dataset_exists(dataset_name):
        raise ReviewError(f"no FiftyOne dataset named {dataset_name!r}: run `svd review export` first")
    dataset = fo.load_dataset(dataset_name)
    _check_made_by_svd(dataset)
    labelled = dataset.exists(LABEL_FIELD)
    uids, labels, paths = labelled.values(["svd_uid", f"{LABEL_FIELD}.label", "filepath"])
    bad = [
        f"{uid} ({path}): {label!r}"
        for uid, label, path in zip(uids, labels, paths, strict=True)
        if label not in LABELS
    ]
    if bad:
        raise ReviewError(
            f"dataset {dataset_name!r}: {len(bad)} sample(s) with a {LABEL_FIELD} label other than"
            f" {' or '.join(LABELS)}; fix them in FiftyOne and import again: {_listed(bad)}"
        )

    reviewed_at = time.time() if now is None else now
    report = ImportReport()
    conn.execute("BEGIN IMMEDIATE")
    try:
        for uid, label in zip(uids, labels, strict=True):
            row = conn.execute("SELECT review_label FROM samples WHERE uid = ?", (uid,)).fetchone()
            value = LABELS[label]
            if row is None:
                report.missing.append(uid)
                continue
            if row[0] == value:
                report.unchanged += 1
                continue
            conn.execute(
                "UPDATE samples SET review_label = ?, reviewed_at = ?, reviewer = ? WHERE uid = ?",
                (value, reviewed_at, reviewer, uid),
            )
            if row[0] is None:
                report.new += 1
            else:
                report.changed += 1
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return report


def _open_dataset(fo: Any, name: str) -> Any:
    if not fo.dataset_exists(name):
        dataset = fo.Dataset(name, persistent=True)
        dataset.add_sample_field("svd_uid", fo.StringField)
        dataset.add_sample_field(LABEL_FIELD, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
        # In-App annotation (FiftyOne >= 1.13) offers exactly these two classes.
        dataset.set_label_schemas(
            {LABEL_FIELD: {"type": "classification", "component": "radio", "classes": list(LABELS)}}
        )
        dataset.activate_label_schemas(LABEL_FIELD)
        return dataset
    dataset = fo.load_dataset(name)
    _check_made_by_svd(dataset)
    dataset.persistent = True
    return dataset


def _check_made_by_svd(dataset: Any) -> None:
    if "svd_uid" not in dataset.get_field_schema():
        raise ReviewError(
            f"FiftyOne dataset {dataset.name!r} was not made by `svd review export` (no svd_uid field):"
            " pick another name with --dataset"
        )


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown if len(names) <= MAX_LISTED else f"{shown} and {len(names) - MAX_LISTED} more"


# --- CLI: svd review export|import ---


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(required=True, metavar="ACTION")
    export = sub.add_parser("export", help="add unlabelled samples to the FiftyOne dataset (most uncertain first)")
    export.add_argument(
        "--dataset", default=DEFAULT_DATASET, help=f"FiftyOne dataset name (default: {DEFAULT_DATASET})"
    )
    export.add_argument("--limit", type=positive_int, default=None, help="add at most this many new samples")
    export.add_argument("--prune", action="store_true", help="remove dataset samples gone from samples.db")
    export.set_defaults(func=run_export)
    imp = sub.add_parser("import", help="write the labels set in the FiftyOne dataset into samples.db")
    imp.add_argument("--dataset", default=DEFAULT_DATASET, help=f"FiftyOne dataset name (default: {DEFAULT_DATASET})")
    imp.add_argument("--reviewer", default=None, help="stored with each label (default: $USER)")
    imp.set_defaults(func=run_import)


def run_export(args: argparse.Namespace, cfg: Config) -> int:
    """`svd review export`: 0, or 1 with a one-line error."""
    from svd.samples.db import connect_readonly

    images_dir = cfg.state_dir / IMAGES_SUBDIR
    try:
        load_fiftyone()  # a missing extra is the first thing to say
        conn = connect_readonly(cfg.samples_db)
        try:
            r = export_samples(conn, args.dataset, images_dir, limit=args.limit, prune=args.prune)
        finally:
            conn.close()
    except _reported_errors() as e:
        return _fail("export", e)
    print(
        f"dataset {args.dataset}: {r.added} samples added ({r.images_written} image files written to {images_dir}),"
        f" {r.already_in_dataset} already there, {r.left_out} left for later (--limit)"
    )
    if r.unknown_format:
        print(f"{len(r.unknown_format)} samples not exported, image format unknown: {_listed(r.unknown_format)}")
    if r.bad_sha256:
        print(f"{len(r.bad_sha256)} samples not exported, image_sha256 not a sha256 digest: {_listed(r.bad_sha256)}")
    if r.gone:
        what = "removed from the dataset" if r.pruned else "kept in the dataset until --prune"
        print(f"{len(r.gone)} samples gone from samples.db (retention), {what}: {_listed(r.gone)}")
    return 0


def run_import(args: argparse.Namespace, cfg: Config) -> int:
    """`svd review import`: 0, or 1 with a one-line error (nothing written then)."""
    from svd.samples.db import connect_existing

    reviewer = args.reviewer or getpass.getuser()
    try:
        load_fiftyone()
        # Never migrates: a running daemon of another version owns the schema.
        conn = connect_existing(cfg.samples_db)
        try:
            r = import_labels(conn, args.dataset, reviewer)
        finally:
            conn.close()
    except _reported_errors() as e:
        return _fail("import", e)
    print(
        f"dataset {args.dataset}: {r.new} new labels, {r.changed} changed, {r.unchanged} unchanged"
        f" (reviewer {reviewer})"
    )
    if r.missing:
        print(f"{len(r.missing)} labelled samples gone from samples.db, not imported: {_listed(r.missing)}")
    return 0


def _reported_errors() -> tuple[type[Exception], ...]:
    """What a review command reports in one line: its own errors, samples.db's, FiftyOne's database's."""
    from svd.samples.db import DatabaseError

    ours = (ReviewError, DatabaseError, sqlite3.OperationalError)  # e.g. "database is locked"
    try:
        from fiftyone.core.config import FiftyOneConfigError  # e.g. no mongod in fiftyone/db/bin
        from pymongo.errors import PyMongoError
    except ImportError:  # the extra is missing: load_fiftyone() says so
        return ours
    # FiftyOne raises ConnectionError when no mongod answers on database_uri.
    return (*ours, FiftyOneConfigError, PyMongoError, ConnectionError)


def _fail(action: str, e: Exception) -> int:
    # FiftyOne's and MongoDB's errors get a pointer to where their set-up is explained.
    hint = "" if type(e).__module__.startswith(("svd.", "sqlite3")) else " (docs/review.md)"
    print(f"svd: review {action}: {' '.join(str(e).split())}{hint}", file=sys.stderr)
    return 1
