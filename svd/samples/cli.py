"""`svd samples`: what the uncertain-sample log holds, and export of a selection to a folder.

Reads the database file directly, read-only, so it works whether the daemon
runs or not (WAL lets readers and the one writer work at once). When it holds
no sample, or fewer than a training run needs, it says why: from the running
daemon's counters since its start (answers to the development key, confident
answers not drawn at random, drops), or without a daemon from the config.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from svd.config import Config, SamplesConfig
from svd.control import running_status
from svd.samples.db import (
    IMAGE_SUFFIXES,
    LABEL_SQL,
    SHA256_RE,
    SOURCES,
    DatabaseError,
    connect_readonly,
    write_image_file,
)

LABEL_STATES = ("unlabelled", "testnet", "reviewed", "labelled")
# A sample's label state: a review label wins over the testnet label.
_STATE_SQL = (
    "CASE WHEN review_label IS NOT NULL THEN 'reviewed'"
    " WHEN testnet_label IS NOT NULL THEN 'testnet' ELSE 'unlabelled' END"
)
_LABEL_WHERE = {
    "unlabelled": f"{LABEL_SQL} IS NULL",
    "testnet": "review_label IS NULL AND testnet_label IS NOT NULL",
    "reviewed": "review_label IS NOT NULL",
    "labelled": f"{LABEL_SQL} IS NOT NULL",
}
# Export file names are built from images.format too: only values of this shape become a suffix.
_FORMAT = re.compile(r"^[a-z0-9]{1,10}$")
_INDEX_FIELDS = (
    "uid",
    "image",
    "image_sha256",
    "received_at",
    "caller_hotkey",
    "prediction",
    "source",
    "testnet_label",
    "review_label",
    "reviewer",
    "reviewed_at",
    "engine",
    "engine_version",
    "backbone_sha256",
    "feature_dim",
)
STATUS_TIMEOUT_S = 2.0
DEV_KEY = "the development key (//Alice, what svd bench signs with)"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True)
class Selection:
    label: str | None = None
    source: str | None = None
    since: float | None = None  # unix s
    limit: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if self.label:
            clauses.append(_LABEL_WHERE[self.label])
        if self.source:
            clauses.append("source = ?")
            params.append(self.source)
        if self.since is not None:
            clauses.append("received_at >= ?")
            params.append(self.since)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def counts(conn: sqlite3.Connection, band_low: float, band_high: float) -> dict[str, Any]:
    """Samples by band (against the configured band), label state, source and UTC day."""

    def grouped(expr: str, params: tuple[Any, ...] = ()) -> dict[str, int]:
        rows = conn.execute(f"SELECT {expr} AS k, count(*) FROM samples GROUP BY k ORDER BY k", params)
        return {str(k): int(n) for k, n in rows}

    total, first, last = conn.execute("SELECT count(*), min(received_at), max(received_at) FROM samples").fetchone()
    images, image_bytes = conn.execute("SELECT count(*), coalesce(sum(bytes), 0) FROM images").fetchone()
    band = "CASE WHEN prediction BETWEEN ? AND ? THEN 'in-band' ELSE 'confident' END"
    return {
        "samples": int(total),
        "images": int(images),
        "image_bytes": int(image_bytes),
        "first": first,
        "last": last,
        "band": {"in-band": 0, "confident": 0, **grouped(band, (band_low, band_high))},
        "label": {"unlabelled": 0, "testnet": 0, "reviewed": 0, **grouped(_STATE_SQL)},
        "source": grouped("source"),
        "day": grouped("date(received_at, 'unixepoch')"),
    }


def export(conn: sqlite3.Connection, out: Path, selection: Selection) -> tuple[int, int, list[str]]:
    """Write the selected samples' images (named by hash) and index.csv + index.jsonl to `out`.

    Oldest first. Returns (samples, image files written, uids skipped); an
    image already in `out` is not written again. A row whose image_sha256 or
    format could not safely name a file is skipped, not exported.
    """
    out.mkdir(parents=True, exist_ok=True)
    where, params = selection.where()
    limit = f" LIMIT {int(selection.limit)}" if selection.limit else ""
    rows = conn.execute(
        "SELECT uid, image_sha256, received_at, caller_hotkey, prediction, source, testnet_label, review_label,"
        " reviewer, reviewed_at, engine, engine_version, backbone_sha256, feature_dim, images.format"
        f" FROM samples JOIN images ON images.sha256 = samples.image_sha256{where}"
        f" ORDER BY received_at, id{limit}",
        params,
    )
    n = written = 0
    skipped: list[str] = []
    with (
        open(out / "index.csv", "w", newline="") as csv_file,
        open(out / "index.jsonl", "w") as jsonl,
    ):
        writer = csv.DictWriter(csv_file, fieldnames=_INDEX_FIELDS)
        writer.writeheader()
        for row in rows:
            record = dict(zip(_INDEX_FIELDS[:1] + _INDEX_FIELDS[2:], row[:-1], strict=True))
            if not (SHA256_RE.match(str(record["image_sha256"])) and _FORMAT.match(str(row[-1]))):
                skipped.append(str(record["uid"]))
                continue
            name = f"{record['image_sha256']}{IMAGE_SUFFIXES.get(row[-1], '.' + row[-1])}"
            record["image"] = name
            record["received_at"] = _iso(record["received_at"])
            if record["reviewed_at"] is not None:
                record["reviewed_at"] = _iso(record["reviewed_at"])
            written += write_image_file(conn, str(record["image_sha256"]), out / name)
            writer.writerow(record)
            jsonl.write(json.dumps({k: record[k] for k in _INDEX_FIELDS}) + "\n")
            n += 1
    return n, written, skipped


def parse_since(text: str, now: float | None = None) -> float:
    """'36h', '7d', '90m' ago, or an ISO date/time (UTC unless it names a zone), as unix seconds."""
    match = _DURATION.match(text)
    if match:
        return (time.time() if now is None else now) - float(match[1]) * _UNITS[match[2]]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since: expected e.g. 24h, 7d or 2026-11-25[T12:00], got {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def render(c: dict[str, Any], cfg: SamplesConfig) -> str:
    if not c["samples"]:
        return "no samples stored"
    lines = [
        f"samples  {c['samples']} ({c['images']} images, {c['image_bytes'] / 1e6:.1f} MB of image bytes),"
        f" {_iso(c['first'])} .. {_iso(c['last'])}",
        f"band     {_pairs(c['band'])}  (band {cfg.band_low}..{cfg.band_high})",
        f"label    {_pairs(c['label'])}",
        f"source   {_pairs(c['source'])}",
        "day (UTC)",
        *(f"  {day}  {n}" for day, n in c["day"].items()),
    ]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.set_defaults(func=run_samples, action=None)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    ex = sub.add_parser("export", help="write a selection's images and an index (CSV and JSONL) to DIR")
    ex.add_argument("dir", type=Path)
    ex.add_argument("--label", choices=LABEL_STATES, help="label state (labelled: testnet or reviewed)")
    ex.add_argument("--source", choices=SOURCES, help="why it was kept")
    ex.add_argument("--since", help="received since: 24h, 7d, or an ISO date/time (UTC)")
    ex.add_argument("--limit", type=positive_int, help="at most N samples, oldest first")


def run_samples(args: argparse.Namespace, cfg: Config) -> int:
    try:
        conn = connect_readonly(cfg.samples_db)
    except DatabaseError as e:
        print(f"svd samples: {e}", file=sys.stderr)
        if not cfg.samples_db.exists():
            off = "samples are off ([samples] enabled = false)"
            print(f"svd samples: {off if not cfg.samples.enabled else 'svd run creates it at start'}", file=sys.stderr)
        return 1
    try:
        if args.action == "export":
            try:
                since = parse_since(args.since) if args.since else None
            except ValueError as e:
                print(f"svd samples export: {e}", file=sys.stderr)
                return 2
            selection = Selection(args.label, args.source, since, args.limit)
            n, written, skipped = export(conn, args.dir, selection)
            print(f"{n} samples exported to {args.dir} ({written} image files written, index.csv, index.jsonl)")
            if skipped:
                shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
                print(
                    f"svd samples export: {len(skipped)} samples skipped, image_sha256 or format in the database"
                    f" cannot name a file: {shown}",
                    file=sys.stderr,
                )
            return 0
        _print_counts(conn, cfg, as_json=args.json)
        return 0
    except sqlite3.Error as e:
        print(f"svd samples: {cfg.samples_db}: {e}", file=sys.stderr)
        return 1
    finally:
        conn.close()


def _print_counts(conn: sqlite3.Connection, cfg: Config, as_json: bool) -> None:
    """The counts, the running daemon's counters, and below train.min_images samples why there are so few."""
    c = counts(conn, cfg.samples.band_low, cfg.samples.band_high)
    running = daemon_samples(cfg)
    why = why_few(cfg, running) if c["samples"] < cfg.train.min_images else []
    if as_json:
        print(json.dumps({**c, "daemon": running, "why": why}, indent=2))
    else:
        print("\n".join([render(c, cfg.samples), *_since_start(running), *_why_lines(c["samples"], why)]))


def daemon_samples(cfg: Config) -> dict[str, Any] | None:
    """The running daemon's sample counters since its start (SampleLog.status()), or None when none answers."""
    status = running_status(cfg.socket_path, STATUS_TIMEOUT_S)
    samples = status.get("samples") if status is not None else None
    return samples if isinstance(samples, dict) else None


def why_few(cfg: Config, running: dict[str, Any] | None) -> list[str]:
    """Why samples.db holds no or few samples, most telling first, one sentence each.

    Args:
        cfg: the configuration (the [samples] policy; the daemon's socket).
        running: the running daemon's counters (daemon_samples()); None: said from the config alone.
    """
    s = cfg.samples
    policy = (
        f"confident answers (outside the band {s.band_low}..{s.band_high}) are kept only at [samples] random_rate "
        f"{s.random_rate:g}, unless they carry a testnet label"
    )
    # The running daemon's word wins: `enabled` takes effect only at a restart.
    if not (s.enabled if running is None else running.get("enabled")):
        where = "[samples] enabled = false" if running is None else "the running daemon started with them off"
        return [f"samples are off ({where}): svd keeps no answer; set [samples] enabled = true and restart svd"]
    if running is None:
        reasons = [f"no daemon answers on {cfg.socket_path}: it counts why answers were not kept since its start"]
        if not s.keep_dev_key:
            reasons.append(f"answers to {DEV_KEY} are never kept ([samples] keep_dev_key = false)")
        return [*reasons, policy]
    return _counted_reasons(running, s, policy)


def _counted_reasons(c: dict[str, Any], s: SamplesConfig, policy: str) -> list[str]:
    offered, dev, kept = (int(c.get(k) or 0) for k in ("offered", "skipped_dev_key", "kept"))
    if not offered:
        return ["the running daemon has answered no query since it started: there was nothing to keep"]
    reasons = []
    if dev:
        reasons.append(
            f"{dev} of its {offered} answers went to {DEV_KEY}: never kept unless [samples] keep_dev_key = true"
        )
    if confident := offered - dev - kept:
        reasons.append(f"{confident} of its {offered} answers were not kept: {policy}")
    drops = {
        "dropped_full": "dropped with the queue full ([samples] queue_max, queue_max_bytes)",
        "dropped_errors": f"lost to write errors (last: {c.get('last_error')})",
        "dropped_closed": "offered while svd shut down",
        "retention_deleted": "deleted by retention ([samples] max_samples, max_bytes)",
    }
    reasons += [f"{c[k]} kept answers {what}" for k, what in drops.items() if c.get(k)]
    if c.get("errored"):
        reasons.append(f"the sample writer stopped ({c['errored']}): nothing is written until svd restarts")
    return reasons or [f"it kept {kept} of its {offered} answers; {policy}"]


def _since_start(running: dict[str, Any] | None) -> list[str]:
    if running is None or not running.get("enabled"):
        return []
    keys = ("offered", "skipped_dev_key", "kept", "written", "queued", "dropped_full", "dropped_errors")
    return [f"daemon   since its start: {_pairs({k: int(running.get(k) or 0) for k in keys})}"]


def _why_lines(stored: int, why: list[str]) -> list[str]:
    if not why:
        return []
    return ["why none:" if not stored else f"why only {stored}:", *(f"  {reason}" for reason in why)]


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def _pairs(d: dict[str, int]) -> str:
    return "  ".join(f"{k} {v}" for k, v in d.items()) or "none"


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
