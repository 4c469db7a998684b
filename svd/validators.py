"""Who asked, and when: the record of validators that queried (state/validators.json).

The subnet's validators can stop querying for days (the halt of May 2026:
protocol.md), and a miner must say so rather than look broken or healthy by
silence: `svd status`, the metrics and `svd doctor` read this record. Only the
event loop writes it; saving runs in a thread on a copy taken on the loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Callers the record keeps; beyond it the least recently seen is forgotten.
MAX_VALIDATORS = 1024
VALIDATORS_FORMAT = 1  # the "format" of state/validators.json
# How often the daemon writes the record when it changed: a SIGKILL loses at most this much.
SAVE_EVERY_S = 60.0


@dataclass
class Seen:
    """One caller that passed authentication: its queries, first and last (unix seconds), the last HTTP status."""

    hotkey: str
    queries: int
    first_time: float
    last_time: float
    status: int


class ValidatorLog:
    """Who asked, and when: every caller that passed authentication, answered or not.

    record() is an O(1) dict update on the event loop; the daemon saves the
    record to state/validators.json now and then (dump() on the loop, save()
    in a thread) and reads it back at start, so "the last validator query"
    outlives restarts.

    Args:
        dev_hotkeys: development keys (svd bench's //Alice): their queries are
            recorded and marked, and are never "the last validator query".
        max_hotkeys: callers kept; beyond it the least recently seen is forgotten.
        since: when the record began (unix seconds); now by default.
    """

    def __init__(
        self, dev_hotkeys: Iterable[str] = (), max_hotkeys: int = MAX_VALIDATORS, since: float | None = None
    ) -> None:
        self.dev_hotkeys = frozenset(dev_hotkeys)
        self.max_hotkeys = max_hotkeys
        self.since = time.time() if since is None else since
        self._seen: OrderedDict[str, Seen] = OrderedDict()  # least recently seen first
        # A new record is unsaved: when it began must outlive a restart too.
        self.changes = 1
        self._saved = 0
        self._save_lock = threading.Lock()

    def record(self, hotkey: str, status: int, now: float | None = None) -> None:
        """One query of `hotkey`, answered with HTTP `status`."""
        now = time.time() if now is None else now
        seen = self._seen.get(hotkey)
        if seen is None:
            seen = self._seen[hotkey] = Seen(hotkey, 0, now, now, status)
            if len(self._seen) > self.max_hotkeys:
                self._seen.popitem(last=False)
        else:
            self._seen.move_to_end(hotkey)
        seen.queries += 1
        seen.last_time = now
        seen.status = status
        self.changes += 1

    def latest(self) -> Seen | None:
        """The most recent query of a validator (a development key's never counts)."""
        return next((s for s in reversed(self._seen.values()) if s.hotkey not in self.dev_hotkeys), None)

    def status(self) -> dict[str, Any]:
        """For the status snapshot: since, validators seen (development keys not counted), the latest
        validator query, and every caller most recent first (each with `dev`)."""
        latest = self.latest()
        return {
            "since": self.since,
            "seen": sum(hotkey not in self.dev_hotkeys for hotkey in self._seen),
            "latest": asdict(latest) if latest else None,
            "recent": [{**asdict(s), "dev": s.hotkey in self.dev_hotkeys} for s in reversed(self._seen.values())],
        }

    @property
    def unsaved(self) -> bool:
        return self.changes != self._saved

    def dump(self) -> tuple[int, dict[str, Any]]:
        """What save() writes, taken on the event loop: (the change count, the record as JSON data)."""
        data = {
            "format": VALIDATORS_FORMAT,
            "since": self.since,
            "validators": [asdict(s) for s in self._seen.values()],
        }
        return self.changes, data

    def save(self, path: Path, dumped: tuple[int, dict[str, Any]]) -> None:
        """Write a dump() to `path` atomically (a temp file, fsync, rename); from any thread.

        A dump older than the one last written is skipped: a slow periodic write never
        replaces the one shutdown made after it. Raises OSError.
        """
        changes, data = dumped
        with self._save_lock:
            if changes <= self._saved:
                return
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            self._saved = changes

    @classmethod
    def read(cls, path: Path, dev_hotkeys: Iterable[str] = (), max_hotkeys: int = MAX_VALIDATORS) -> ValidatorLog:
        """The record save() wrote. Raises OSError (FileNotFoundError: none yet) or ValueError (not such a file)."""
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != VALIDATORS_FORMAT:
            raise ValueError(f"not a validator record of format {VALIDATORS_FORMAT}")
        rows = data.get("validators")
        if not _is_time(data.get("since")) or not isinstance(rows, list):
            raise ValueError("expected a number `since` and a list `validators`")
        seen = sorted((_seen_from(row, i) for i, row in enumerate(rows)), key=lambda s: s.last_time)
        log = cls(dev_hotkeys, max_hotkeys, since=float(data["since"]))
        for s in seen[-max_hotkeys:]:
            log._seen[s.hotkey] = s
        log._saved = log.changes  # as read: nothing to save
        return log


def _seen_from(row: Any, i: int) -> Seen:
    if not (
        isinstance(row, dict)
        and isinstance(row.get("hotkey"), str)
        and all(_is_count(row.get(key)) for key in ("queries", "status"))
        and all(_is_time(row.get(key)) for key in ("first_time", "last_time"))
    ):
        raise ValueError(f"validators[{i}]: expected hotkey, queries, first_time, last_time and status")
    return Seen(row["hotkey"], row["queries"], float(row["first_time"]), float(row["last_time"]), row["status"])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def load_record(path: Path, dev_hotkeys: Iterable[str]) -> ValidatorLog:
    """The record the last run saved at `path`; a new one when there is none, or it cannot be read (logged)."""
    try:
        return ValidatorLog.read(path, dev_hotkeys)
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        log.warning("validators_record_ignored", path=str(path), error=str(e))
    return ValidatorLog(dev_hotkeys)


async def save_record(record: ValidatorLog, path: Path) -> None:
    """Write the record to `path` when it changed: copied on the loop, written in a thread."""
    if not record.unsaved:
        return
    try:
        await asyncio.to_thread(record.save, path, record.dump())
    except OSError as e:  # a full disk must not stop serving: the next try may succeed
        log.warning("validators_record_not_saved", path=str(path), error=str(e))


async def keep_record(record: ValidatorLog, path: Path) -> None:
    """The daemon's task: save_record() every SAVE_EVERY_S, until cancelled (shutdown saves once more)."""
    while True:
        await asyncio.sleep(SAVE_EVERY_S)
        await save_record(record, path)
