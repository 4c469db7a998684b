"""Engine hot swap: which engine serves, and the swaps between engines.

`HotSwap` decides: a candidate is readied beside the serving engine by
serving.prepare_engine() (verify, load, warm up, canary: each step a job on
the engine worker, so batches run between them), then ServingEngine.replace()
on the event loop, which takes effect between two batches, and the old engine
is closed on the worker afterwards (the inference lane is FIFO, so a batch
already handed to the old engine finishes first). `EngineWatcher` feeds it
engine directories renamed into `engines/`.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog
from watchfiles import Change, awatch

from svd.config import EngineConfig
from svd.control import CommandError
from svd.engine.load import Engine, EngineError, list_engines
from svd.engine.manifest import TEMP_PREFIX, Manifest, read_manifest, serving_rank, verify_engine_dir
from svd.engine.serving import ServingEngine, prepare_engine
from svd.engine.worker import EngineWorker

log = structlog.get_logger(__name__)


class SwapRefused(CommandError):
    """A swap or rollback command could not be done; the serving engine is unchanged."""


@dataclass(frozen=True)
class Refusal:
    name: str
    error: str
    time: float


Rank = tuple[bool, datetime, str]


def _rank(path: Path) -> Rank:
    """newest_engine()'s order: a trained head first, then manifest created time, then name."""
    return serving_rank(read_manifest(path), path.name)


def _serving_rank(engine: Engine) -> Rank:
    return serving_rank(engine.manifest, engine.path.name)


class HotSwap:
    """Which engine serves, and the swaps between engines.

    Args:
        serving: the holder of the serving engine (the batcher reads the same one).
        worker: the engine worker.
        cfg: backend, threads and warm-up sizes for loading; a set `name` pins.
        engines_dir: where engine directories live.
    """

    def __init__(self, serving: ServingEngine, worker: EngineWorker, cfg: EngineConfig, engines_dir: Path) -> None:
        self._holder = serving
        self._worker = worker
        self._cfg = cfg
        self._dir = engines_dir
        self.pinned = bool(cfg.name)
        self.swaps = 0
        self.last_refusal: Refusal | None = None
        # Engines served before the current one in this run, oldest first: rollback's first choice.
        self._served: list[Path] = []
        # Refused in this run: rollback does not try them again.
        self._refused: set[Path] = set()
        # One swap at a time, whether from the watcher or a command.
        self._lock = asyncio.Lock()
        # An engine without a trained head newer than the trained one serving: it waits for its first
        # head (name, backbone), until an engine with a trained head on that backbone serves.
        self._waiting: tuple[str, str] | None = None
        if self.serving.manifest.head_trained:
            created = self.serving.manifest.created
            for path in list_engines(engines_dir):
                m = _safe_manifest(path)
                if m is not None and not m.head_trained and m.created > created:
                    self._waiting = (path.name, m.backbone_sha256)

    @property
    def serving(self) -> Engine:
        return self._holder.engine

    def status(self) -> dict[str, Any]:
        e, r = self.serving, self.last_refusal
        return {
            "name": e.name,
            "version": e.version,
            "backend": e.backend_name,
            "plan_unusable": e.plan_unusable,
            "path": str(e.path),
            "created": e.manifest.created.isoformat(),
            "head_trained": e.manifest.head_trained,
            "untrained_waiting": self._waiting[0] if self._waiting else None,
            "pinned": self.pinned,
            "swaps": self.swaps,
            "last_refusal": {"name": r.name, "error": r.error, "time": r.time} if r else None,
        }

    def commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        """Control socket handlers: `swap` (name), `rollback` and `unpin`."""
        return {
            "swap": lambda req: self.swap_to(str(req.get("name", ""))),
            "rollback": lambda _: self.rollback(),
            "unpin": lambda _: self.unpin(),
        }

    async def unpin(self) -> dict[str, Any]:
        """Let newer engines swap in again, and serve the one that ranks first on disk now (the newest
        trained one) if that is not the serving one; if it is refused, the serving engine stays."""
        self.pinned = False
        log.info("engine_unpinned", serving=self.serving.name)
        async with self._lock:
            ranked = await asyncio.to_thread(self._ranked)
            for path in ranked:
                if path == self.serving.path or await self._verify_and_swap(path):
                    break  # the best engine that loads serves; a refused one is passed over
        return self.status()

    def _ranked(self) -> list[Path]:
        """Engines on disk best first (trained, newest), less those refused in this run."""
        ranked = sorted(((r, p) for p in list_engines(self._dir) if (r := _safe_rank(p))), reverse=True)
        return [p for _, p in ranked if p not in self._refused]

    async def offer(self, path: Path) -> bool:
        """A new directory appeared: serve it if it is good and newer than the serving one, unless pinned."""
        async with self._lock:
            manifest = await self._verified(path)
            if manifest is None:
                return False
            if self.pinned or serving_rank(manifest, path.name) <= _serving_rank(self.serving):
                why = "pinned" if self.pinned else "untrained head" if not manifest.head_trained else "not newer"
                log.info("engine_not_swapped", name=path.name, serving=self.serving.name, why=why)
                if why == "untrained head":
                    self._waiting = (path.name, manifest.backbone_sha256)
                return False
            return await self._swap(path, manifest)

    async def swap_to(self, name: str) -> dict[str, Any]:
        """Pin and serve engines/<name>; raises SwapRefused if it is missing or bad."""
        path = self._dir / name
        engines = list_engines(self._dir)
        if not name or path not in engines:
            there = ", ".join(p.name for p in engines) or "none"
            raise SwapRefused(f"no engine {name!r} in {self._dir} (engines there: {there})")
        async with self._lock:
            if path != self.serving.path and not await self._verify_and_swap(path):
                raise SwapRefused(f"engine {name!r} refused: {self.last_refusal.error if self.last_refusal else '?'}")
            self.pinned = True
            return self.status()

    async def rollback(self) -> dict[str, Any]:
        """Pin and serve the engine that served before this one; after a restart (no history),
        the newest older engine on disk. Candidates refused in this run are skipped, and one that
        fails to load is refused and the next is tried, so a bad engine never blocks a rollback."""
        async with self._lock:
            candidates = self._rollback_candidates()
            if not candidates:
                raise SwapRefused(f"no engine to roll back to from {self.serving.name} in {self._dir}")
            for path in candidates:
                # A rollback pops the history rather than pushing onto it, so a second
                # rollback goes further back instead of returning to where the first began.
                if await self._verify_and_swap(path, remember=False):
                    self._served = [p for p in self._served if p != path]
                    self.pinned = True
                    return self.status()
            tried = ", ".join(p.name for p in candidates)
            raise SwapRefused(f"every rollback candidate was refused ({tried}); still serving {self.serving.name}")

    def _rollback_candidates(self) -> list[Path]:
        on_disk = set(list_engines(self._dir))
        current = _serving_rank(self.serving)
        older = sorted(((o, p) for p in on_disk if (o := _safe_rank(p)) and o < current), reverse=True)
        ordered = [*reversed(self._served), *(p for _, p in older)]
        seen: set[Path] = {self.serving.path}
        picked = []
        for path in ordered:
            if path in on_disk and path not in seen and path not in self._refused:
                seen.add(path)
                picked.append(path)
        return picked

    async def _verified(self, path: Path) -> Manifest | None:
        """Hashes and manifest checked in a thread of its own: hashing a large backbone takes
        seconds, which on the engine worker would stall inference. None (and a refusal) if bad."""
        try:
            return await asyncio.to_thread(verify_engine_dir, path)
        except EngineError as e:
            self._refuse(path.name, e)
            return None

    async def _verify_and_swap(self, path: Path, remember: bool = True) -> bool:
        manifest = await self._verified(path)
        return manifest is not None and await self._swap(path, manifest, remember)

    async def _swap(self, path: Path, manifest: Manifest, remember: bool = True) -> bool:
        """Ready the candidate beside the serving engine, then swap. Caller holds the lock."""
        try:
            new = await prepare_engine(self._worker, path, self._cfg, manifest=manifest, reuse=self.serving)
        except Exception as e:  # a bad engine raises anything from ONNX Runtime, torch or safetensors
            self._refuse(path.name, e)
            return False
        # On the loop, between batches: the batcher reads the holder once per batch.
        old = self._holder.replace(new)
        self.swaps += 1
        if remember:
            self._served = [p for p in self._served if p != new.path] + [old.path]
        self._refused.discard(new.path)
        if self._waiting and new.manifest.head_trained and new.manifest.backbone_sha256 == self._waiting[1]:
            self._waiting = None  # its backbone has a trained head now
        log.info("engine_swapped", name=new.name, version=new.version, previous=old.name, swaps=self.swaps)
        await self._worker.run(old.close)
        await asyncio.to_thread(self._prune)
        return True

    def _prune(self) -> None:
        """Keeps the `keep` newest engine directories besides the serving one; removes older ones."""
        if self._cfg.keep == 0:
            return
        # By age alone: an engine just built without a head, waiting for its first training, is new.
        others = sorted(
            ((o[1:], p) for p in list_engines(self._dir) if p != self.serving.path and (o := _safe_rank(p))),
            reverse=True,
        )
        for _, path in others[self._cfg.keep :]:
            try:
                shutil.rmtree(path)
            except OSError as e:
                log.warning("engine_prune_failed", path=str(path), error=str(e))
                continue
            self._served = [p for p in self._served if p != path]
            log.info("engine_pruned", name=path.name, keep=self._cfg.keep)

    def _refuse(self, name: str, error: BaseException) -> None:
        text = str(error) or repr(error)
        self._refused.add(self._dir / name)
        self.last_refusal = Refusal(name, text, round(time.time(), 3))
        log.error("engine_refused", name=name, error=text, serving=self.serving.name)


def _safe_manifest(path: Path) -> Manifest | None:
    try:
        return read_manifest(path)
    except EngineError:
        return None


def _safe_rank(path: Path) -> Rank | None:
    try:
        return _rank(path)
    except EngineError:
        return None


class EngineWatcher:
    """Offers each directory renamed into `engines/` to HotSwap.

    Dot-named entries are writers' temp dirs and are ignored; so is anything
    deeper than `engines/` itself (recursive=False): a writer renames a whole
    directory into place, and that rename is the one event that counts.
    """

    def __init__(self, hotswap: HotSwap, engines_dir: Path, debounce_ms: int) -> None:
        self._hotswap = hotswap
        self._dir = engines_dir
        self._debounce_ms = debounce_ms
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Watch until stop(); one bad engine never ends the loop."""
        self._dir.mkdir(parents=True, exist_ok=True)
        log.info("engine_watch_started", dir=str(self._dir), debounce_ms=self._debounce_ms)
        async for changes in awatch(
            self._dir,
            watch_filter=_renamed_in,
            debounce=self._debounce_ms,
            stop_event=self._stop,
            recursive=False,
        ):
            names = sorted({Path(p).name for _, p in changes})
            for name in names:
                path = self._dir / name
                if path.is_dir():
                    await self._hotswap.offer(path)
        log.info("engine_watch_stopped")


def _renamed_in(change: Change, path: str) -> bool:
    return change == Change.added and not Path(path).name.startswith(TEMP_PREFIX)
