"""One training run: data -> features -> head -> holdout verdict -> a new engine, or not -> report.

The same run serves the daemon's schedule and `svd train --standalone`: it
needs an engine worker and the engine whose backbone it trains on (the
serving one). Everything that touches the accelerator is an idle-lane job
on that worker (feature slices, head steps, holdout scoring); everything
else runs in threads. A promoted head is written with write_head_engine()
into engines/, atomically, where hot swap picks it up; a rejected or failed
run writes its report and no engine. Nothing a run does can fail a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import structlog

from svd.config import Config, TrainConfig, parse_generation
from svd.engine.build import write_head_engine
from svd.engine.head import Head
from svd.engine.load import Engine, load_head
from svd.engine.manifest import HEAD
from svd.engine.worker import EngineWorker, Progress
from svd.process import try_flock
from svd.train import logged
from svd.train.features import FEATURES_DB, FeatureCache, extract_slices, training_pool
from svd.train.fit import FeatureSet, FitConfig, FitResult, fit_head, head_probs, warm_optimiser
from svd.train.gate import GateConfig, Verdict, by_kind, judge
from svd.train.report import append_history, read_history, write_report
from svd.train.sources import IMAGE_FOLDER, SourceSpec, configured_sources
from svd.train.splits import MixConfig, assemble
from svd.train.synth.store import synth_images_present
from svd.train.views import AS_SERVED, ViewKey, plan_views, render_views

log = structlog.get_logger(__name__)

LOCK = "train.lock"
# Views rendered per chunk (~19 MB of pixels): the CPU renders the next chunk while the engine runs this one.
CHUNK_VIEWS = 128
SUMMARY_METRICS = ("mcc", "accuracy", "reward_proxy", "auc", "ece", "n")


class RunBusy(Exception):
    """Another run holds the state dir's training lock (the daemon's, or a standalone one)."""


@dataclass
class RunState:
    """What `svd status` shows of a run while it goes and once it is over."""

    run_id: str
    trigger: str
    started: float
    stage: str = "starting"
    done: int = 0
    total: int | None = None
    result: str | None = None  # promoted | rejected | skipped | failed | cancelled
    reason: str = ""
    finished: float | None = None
    engine: str | None = None
    candidate: dict[str, Any] | None = None
    serving: dict[str, Any] | None = None
    # Holdout MCC and accuracy per kind of image (real, synthetic, served), candidate and serving.
    by_kind: dict[str, dict[str, Any]] | None = None
    features: dict[str, int] = dataclasses.field(default_factory=dict)
    # Each fit epoch done so far: {"epoch", "val_loss"} (svd train now --wait prints them).
    epochs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    report: str | None = None

    def summary(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["duration_s"] = round((self.finished or time.time()) - self.started, 1)
        return out


def new_run_id(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")


def source_specs(cfg: Config) -> list[SourceSpec]:
    """The [train] sources as scanners take them, plus the samples database and the synthetic folder."""
    specs = configured_sources(cfg)
    if cfg.train.use_samples and cfg.samples_db.is_file():
        specs.append(SourceSpec("samples", logged.SAMPLES, cfg.samples_db))
    if cfg.synth.use_in_training and synth_images_present(cfg.synth_dir):
        specs.append(SourceSpec("synth", IMAGE_FOLDER, cfg.synth_dir, weight=cfg.synth.weight, synthetic=True))
    return specs


class TrainRun:
    """One run, from data to verdict. Build it, then `await run()`; `state` follows it.

    Args:
        cfg: the whole configuration (train section, paths).
        worker: the engine worker; the run's accelerator work goes to its idle lane.
        engine: the engine to train on (its backbone) and to beat (its head).
        trigger: why it runs ("schedule", "command", "standalone").
        on_progress: told after every stage or slice (the standalone CLI draws bars with it).
    """

    def __init__(
        self,
        cfg: Config,
        worker: EngineWorker,
        engine: Engine,
        trigger: str,
        on_progress: Callable[[RunState], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.tc: TrainConfig = cfg.train
        self.worker = worker
        self.engine = engine
        self.state = RunState(new_run_id(), trigger, time.time())
        self._on_progress = on_progress or (lambda _: None)
        self._cache = FeatureCache(cfg.state_dir / FEATURES_DB)
        self._report: dict[str, Any] = {"run_id": self.state.run_id, "trigger": trigger}
        self._holdout: dict[str, np.ndarray] | None = None

    @property
    def device(self) -> str:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    async def run(self) -> RunState:
        """The whole run; never raises for a bad run (the state says what happened), only when cancelled."""
        s = self.state
        lock = None
        log.info("train_run_started", run_id=s.run_id, trigger=s.trigger, engine=self.engine.name)
        backend = None
        try:
            lock = _take_lock(self.cfg.state_dir)
            # Held for the run: a hot swap meanwhile must not close the backbone the features come from.
            backend = self.engine.shared_backend.acquire()
            await self._stages()
        except asyncio.CancelledError:
            self._end("cancelled", "the run was cancelled (shutdown, or svd train pause)")
            raise
        except RunBusy as exc:
            self._end("skipped", str(exc))
        except Exception as exc:  # a bad source, a full disk, OOM in a slice: the run fails, serving does not
            log.exception("train_run_failed", run_id=s.run_id)
            self._end("failed", f"{type(exc).__name__}: {exc}")
        finally:
            if s.finished is None:
                self._end("failed", "ended without a result")
            if backend is not None:
                await asyncio.shield(self.worker.run(backend.release))  # may close it: engine thread
            await asyncio.shield(self._finish(lock))
        return s

    async def _stages(self) -> None:
        tc = self.tc
        backbone = self.engine.manifest.backbone_sha256
        serving_head = await asyncio.to_thread(load_head, self.engine.path / HEAD, self.engine.manifest)
        self._stage("data")
        splits = MixConfig(tc.holdout_permille, tc.validation_permille, seed=tc.seed)
        data = await asyncio.to_thread(assemble, source_specs(self.cfg), splits)
        self._report["data"] = counts = data.report()
        if len(data.train) < tc.min_images or not data.validation or not data.holdout:
            self._end("skipped", too_little_data(counts, tc.min_images))
            return
        # The holdout is rendered as the chosen validators send images: the gate judges what pays.
        generations, mapping = parse_generation(tc.generation), self.engine.preprocess
        self._report["views"] = {"generation": dict(generations), "preprocess": dataclasses.asdict(mapping)}
        views = {
            "train": plan_views(data.train, tc.views, "train", generations, mapping),
            "validation": plan_views(data.validation, tc.views, "validation", generations, mapping),
            "holdout": plan_views(data.holdout, tc.holdout_views, "holdout", generations, mapping),
        }
        await self._features(backbone, [v for split in views.values() for v in split])
        sets = await asyncio.to_thread(self._feature_sets, backbone, views)
        self._stage("fit")
        fit_cfg = FitConfig(
            tc.hidden,
            tc.learning_rate,
            tc.weight_decay,
            tc.batch_size,
            tc.max_epochs,
            tc.patience,
            tc.seed,
            tc.slice_ms,
        )
        dims = self.engine.manifest.feature_dims
        await asyncio.to_thread(warm_optimiser)
        fitting = fit_head(sets["train"], sets["validation"], dims, fit_cfg, self.device)
        fitted: FitResult = await self._background("fit", fitting, on_slice=self._fit_progress)
        self._report["fit"] = {**fitted.summary(), "history": fitted.history}
        kinds = np.asarray([v.record.origin for v in views["holdout"]])
        verdict = await self._judge(fitted.head, serving_head, sets["holdout"], kinds)
        if verdict.promote:
            await self._deploy(fitted.head, verdict)
        else:
            self._end("rejected", "; ".join(verdict.reasons))

    async def _features(self, backbone: str, views: Sequence[ViewKey]) -> None:
        """Fill the cache with every view it lacks: served features as they are, the rest through the backbone."""
        self._stage("features")
        # Views of another backbone, or of a recipe no run plans now (another mapping, validator
        # generation or augmentation), are never read again by this daemon's runs: drop them, so the
        # cache holds one backbone's worth. A rollback to an older backbone extracts once more.
        pruned = await asyncio.to_thread(self._cache.prune, backbone, {v.recipe for v in views})
        if pruned:
            log.info("train_features_pruned", run_id=self.state.run_id, views=pruned)
        missing = await asyncio.to_thread(self._cache.missing, backbone, [v.key for v in views])
        # As-served views of logged samples whose stored features came from this backbone: kept as they are.
        served = {v.key: f for v in views if v.seed == AS_SERVED and (f := _served_features(v, backbone)) is not None}
        todo_served = [key for key in served if key in missing]
        if todo_served:
            feats = np.stack([served[key] for key in todo_served])
            await asyncio.to_thread(self._cache.put, backbone, todo_served, feats)
        # One view per key: a record drawn twice by the epoch shares its views.
        todo = list({v.key: v for v in views if v.key in missing and v.key not in served}.values())
        s = self.state
        n_views = len({v.key for v in views})
        s.features = {"views": n_views, "cached": n_views - len(missing)}
        s.features["from_samples"], s.features["extracted"], s.features["pruned"] = len(todo_served), 0, pruned
        s.total, s.done = len(todo), 0
        if todo:
            await self._extract(backbone, todo)
        self._report["features"] = dict(s.features)

    async def _extract(self, backbone: str, todo: Sequence[ViewKey]) -> None:
        chunks = [todo[i : i + CHUNK_VIEWS] for i in range(0, len(todo), CHUNK_VIEWS)]
        features_of = self.engine.shared_backend.backend.features
        mapping = self.engine.preprocess
        pool = training_pool(self.tc.threads)
        try:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(pool, render_views, chunks[0], mapping)
            for i, part in enumerate(chunks):
                images = await pending
                if i + 1 < len(chunks):  # the CPU renders the next chunk while the engine runs this one
                    pending = loop.run_in_executor(pool, render_views, chunks[i + 1], mapping)
                slices = extract_slices(features_of, images, self.tc.slice_images, self.tc.slice_ms)
                feats = await self._background(f"features {i + 1}/{len(chunks)}", slices)
                await asyncio.to_thread(self._cache.put, backbone, [v.key for v in part], feats)
                self.state.done += len(part)
                self.state.features["extracted"] += len(part)
                self._on_progress(self.state)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _feature_sets(self, backbone: str, views: dict[str, list[ViewKey]]) -> dict[str, FeatureSet]:
        index: dict[str, int] = {}
        out = {}
        for name, split in views.items():
            keys = [v.key for v in split]
            x = self._cache.get(backbone, keys)
            y = np.asarray([v.record.label for v in split], dtype=np.int64)
            images = np.asarray([index.setdefault(v.record.sha256, len(index)) for v in split], dtype=np.int64)
            out[name] = FeatureSet(x, y, images)
        return out

    async def _judge(self, candidate: Head, serving: Head, holdout: FeatureSet, kinds: np.ndarray) -> Verdict:
        self._stage("holdout")
        device = self.device

        def score() -> Generator[Progress, None, tuple[np.ndarray, np.ndarray]]:
            yield Progress(0, 2, "holdout")
            return head_probs(candidate, holdout.features, device), head_probs(serving, holdout.features, device)

        cand, serv = await self._background("holdout", score())
        tc = self.tc
        gate = GateConfig(tc.min_gain_reward, tc.min_gain_mcc, tc.confidence, seed=tc.seed)
        verdict = await asyncio.to_thread(judge, cand, serv, holdout.labels, holdout.images, gate)
        if not self.engine.manifest.head_trained:
            # The engine's untrained head answers 0.5 to everything: the serving column is a constant
            # predictor (MCC 0), so a first head is promoted only if it beats knowing nothing.
            verdict.reasons.insert(0, "a first head, judged against a constant predictor (the untrained head)")
        self._holdout = {"labels": holdout.labels, "candidate": cand, "serving": serv}
        self.state.candidate = {k: verdict.candidate[k] for k in SUMMARY_METRICS}
        self.state.serving = {k: verdict.serving[k] for k in SUMMARY_METRICS}
        self.state.by_kind = by_kind(cand, serv, holdout.labels, kinds)
        self._report["verdict"] = {**verdict.to_dict(), "by_kind": self.state.by_kind}
        log.info("train_holdout", run_id=self.state.run_id, promote=verdict.promote, gain=verdict.gain)
        return verdict

    async def _deploy(self, head: Head, verdict: Verdict) -> None:
        self._stage("deploy")
        s = self.state
        name = f"nightly-{s.run_id}"
        metrics = {f"{k}": float(verdict.candidate[k]) for k in SUMMARY_METRICS}
        version = datetime.fromtimestamp(s.started, UTC).strftime("%Y.%-m.%-d")
        target = self.cfg.engines_dir / name
        await asyncio.to_thread(
            write_head_engine,
            self.engine.path,
            target,
            head,
            version=version,
            train_run_id=s.run_id,
            holdout_metrics=metrics,
        )
        s.engine = name
        self._end("promoted", "; ".join(verdict.reasons))
        log.info("train_engine_written", run_id=s.run_id, engine=name, path=str(target))

    async def _background(self, name: str, job_slices: Any, on_slice: Callable[[Progress], None] | None = None) -> Any:
        if on_slice is not None:
            job_slices = _forwarded(job_slices, asyncio.get_running_loop(), on_slice)
        job = self.worker.background(f"train {self.state.run_id}: {name}", job_slices)
        return await job.wait()  # cancelled with this task

    def _fit_progress(self, progress: Progress) -> None:
        """On the loop: the fit's epochs into the run's state (a bar, `svd train now --wait`'s lines)."""
        s = self.state
        s.done, s.total = progress.done, progress.total
        if progress.stage == "epoch" and progress.value is not None:
            s.epochs.append({"epoch": progress.done, "val_loss": round(float(progress.value), 6)})
        self._on_progress(s)

    def _stage(self, stage: str) -> None:
        self.state.stage = stage
        self.state.done, self.state.total = 0, None
        log.info("train_stage", run_id=self.state.run_id, stage=stage)
        self._on_progress(self.state)

    def _end(self, result: str, reason: str) -> None:
        s = self.state
        if s.finished is None:
            s.result, s.reason, s.finished = result, reason, time.time()
            s.stage = "done"

    async def _finish(self, lock: IO[str] | None) -> None:
        s = self.state
        self._report["result"] = s.summary()
        self._report["config"] = dataclasses.asdict(self.tc)
        train_dir = self.cfg.train_dir
        try:
            history = [*await asyncio.to_thread(read_history, train_dir), s.summary()]
            s.report = str(train_dir / s.run_id)
            await asyncio.to_thread(write_report, train_dir, s.run_id, self._report, self._holdout, history)
            await asyncio.to_thread(append_history, train_dir, s.summary())
        except Exception as exc:  # a full disk: the run's outcome stands, the report is lost and says so
            log.error("train_report_failed", run_id=s.run_id, error=repr(exc))
            s.report = None
        finally:
            self._cache.close()
            if lock is not None:
                lock.close()
        self._on_progress(s)
        log.info("train_run_finished", run_id=s.run_id, result=s.result, reason=s.reason, report=s.report)


def too_little_data(counts: dict[str, Any], min_images: int) -> str:
    """Why a run stopped before fitting, as a sentence an operator can act on."""
    sources = counts.get("sources") or []
    found = ", ".join(f"{s['name']} ({s['location']}: {s['rows']} rows)" for s in sources) or "none"
    text = (
        f"too little labelled data: {counts['train']} training, {counts['validation']} validation and "
        f"{counts['holdout']} holdout images, and a run needs at least {min_images} training images "
        f"(train.min_images) and some of each. Sources read: {found}."
    )
    if not sources:
        text += (
            " Add a [[train.sources]] to the config (svd demo-data DIR prints one; or the NATIX set: "
            "hf download natix-network-org/roadwork --repo-type dataset), then svd reload."
        )
    return text


def _forwarded(
    slices: Generator[Progress, None, Any], loop: asyncio.AbstractEventLoop, on_slice: Callable[[Progress], None]
) -> Generator[Progress, None, Any]:
    """The job's slices as they are, each one's progress also handed to the event loop (the job runs
    on the engine thread; the run's state belongs to the loop)."""
    try:
        while True:
            try:
                progress = next(slices)
            except StopIteration as done:
                return done.value
            loop.call_soon_threadsafe(on_slice, progress)
            yield progress
    finally:
        slices.close()  # cancelled mid-way: the job's own cleanup runs now


def _served_features(view: ViewKey, backbone: str) -> np.ndarray | None:
    record = view.record
    if isinstance(record, logged.LoggedRecord) and record.features is not None and record.backbone_sha256 == backbone:
        return record.features
    return None


def _take_lock(state_dir: Path) -> IO[str]:
    """One run per state dir, across processes (the daemon's schedule and a standalone run)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    handle, taken = try_flock(state_dir / LOCK)
    if not taken:
        handle.close()
        raise RunBusy(f"another training run holds {state_dir / LOCK}")
    return handle
