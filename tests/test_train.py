"""A training run end to end on generated NATIX-format data: real engine, real worker, real augmentation.

The figures prove the mechanics (features cached, head fitted, metrics exact,
gate, deploy), not accuracy: the backbone is a random tiny DINOv3 and the data
carries a signal such a backbone keeps (svd.train.demo_scenes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from svd.config import Config
from svd.engine.load import Engine
from svd.engine.manifest import HEAD, read_manifest, verify_engine_dir
from svd.engine.serving import prepare_engine
from svd.engine.worker import EngineWorker
from svd.process import try_flock
from svd.status import _train as status_train_row
from svd.train.cli import Said
from svd.train.features import FEATURES_DB, FeatureCache
from svd.train.pipeline import LOCK, RunState, TrainRun
from svd.train.report import PLOTS, REPORT, read_history
from tests.helpers import TRAIN_SMALL, image_folder, make_config


@pytest.fixture(scope="module")
def shuffled_data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same images with their labels permuted (descriptions follow, so no row is skipped)."""
    root = tmp_path_factory.mktemp("shuffled")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for path in sorted((demo_data / "data").glob("*.parquet")):
        table = pq.read_table(path)
        labels = rng.permutation(np.asarray(table.column("label").to_pylist()))
        text = ["roadwork ahead" if v == 1 else "" for v in labels]
        table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int64()))
        index = table.schema.get_field_index("scene_description")
        table = table.set_column(index, "scene_description", pa.array(text, pa.string()))
        pq.write_table(table, root / "data" / path.name)
    return root


@pytest.fixture(scope="module")
def native_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """svd demo-data's default set: native-size JPEG frames and photos (portrait too), a third 1024 PNGs."""
    from svd.train.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("native")
    write_demo_data(root, 360, seed=21, workers=2)
    return root


def train_config(tmp_path: Path, engine: Path, data: Path, **train: Any) -> Config:
    sources = [{"kind": "natix_parquet", "path": str(data)}]
    return make_config(tmp_path, engine, train={**TRAIN_SMALL, "sources": sources, **train})


@pytest.fixture
async def worker() -> AsyncIterator[EngineWorker]:
    w = EngineWorker()
    yield w
    await w.close()


async def serving(worker: EngineWorker, cfg: Config) -> Engine:
    return await prepare_engine(worker, cfg.engines_dir / "tiny", cfg.engine)


async def test_a_run_lifts_the_random_head_and_writes_a_head_engine_then_reuses_every_feature(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, worker: EngineWorker
) -> None:
    cfg = train_config(tmp_path, tiny_engine, demo_data)
    engine = await serving(worker, cfg)
    stale = FeatureCache(cfg.state_dir / FEATURES_DB)  # a view cached under an earlier backbone
    stale.put("0" * 64, [("a" * 64, 0, "current/squash-bilinear")], np.ones((1, 8), np.float32))
    seen: list[str] = []
    first = await TrainRun(cfg, worker, engine, "test", on_progress=lambda s: seen.append(s.stage)).run()
    assert first.result == "promoted", first.reason
    assert {"data", "features", "fit", "holdout", "deploy"} <= set(seen)
    cand, serv = first.candidate or {}, first.serving or {}
    assert cand["mcc"] > 0.4 and cand["mcc"] > serv["mcc"] + 0.2, (cand, serv)
    assert first.features["extracted"] == first.features["views"] > 0 and first.features["cached"] == 0
    assert first.features["pruned"] == 1 and stale.count("0" * 64) == 0
    stale.close()

    # The engine: the serving backbone's files and hash, a new head, the run's id and holdout metrics.
    assert first.engine is not None
    written = verify_engine_dir(cfg.engines_dir / first.engine)
    base = read_manifest(cfg.engines_dir / "tiny")
    assert written.backbone_sha256 == base.backbone_sha256 and written.parts[HEAD] != base.parts[HEAD]
    assert written.train_run_id == first.run_id and written.holdout_metrics["mcc"] == pytest.approx(cand["mcc"])

    # The report and the history.
    report_dir = Path(first.report or "")
    report = json.loads((report_dir / REPORT).read_text())
    assert report["result"]["result"] == "promoted" and report["verdict"]["promote"] is True
    assert report["data"]["holdout"] > 0 and report["fit"]["best_epoch"] >= 1
    for plot in PLOTS:
        assert (report_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [h["run_id"] for h in read_history(cfg.train_dir)] == [first.run_id]

    # A second run on the same data extracts nothing and, seeded, reaches the same verdict.
    second = await TrainRun(cfg, worker, engine, "test").run()
    assert second.features["extracted"] == 0 and second.features["cached"] == first.features["views"]
    assert second.candidate == first.candidate and second.result == "promoted"
    await worker.run(engine.close)


async def test_today_s_validators_on_native_size_data_real_and_synthetic(
    tmp_path: Path, tiny_engine: Path, native_data: Path, worker: EngineWorker
) -> None:
    """generation = "current": one view per image, the JPEG a validator of today sends, through the engine's
    mapping; the run lifts holdout MCC, is promoted, and reports each kind of image apart."""
    sources = [
        {"kind": "natix_parquet", "path": str(native_data)},
        {"kind": "image_folder", "path": str(native_data / "synthetic"), "synthetic": True},
    ]
    cfg = make_config(tmp_path, tiny_engine, train={**TRAIN_SMALL, "sources": sources, "generation": "current"})
    engine = await serving(worker, cfg)
    state = await TrainRun(cfg, worker, engine, "test").run()
    assert state.result == "promoted", state.reason
    cand, serv = state.candidate or {}, state.serving or {}
    assert cand["mcc"] > serv["mcc"] + 0.2, (cand, serv)
    # One view per image: seed 0, the current recipe in the engine's mapping.
    with sqlite3.connect(cfg.state_dir / FEATURES_DB) as db:
        rows = db.execute("SELECT image, seed, recipe FROM views").fetchall()
    assert len(rows) == state.features["views"] == len({image for image, _, _ in rows})
    assert {(seed, recipe) for _, seed, recipe in rows} == {(0, "current/squash-bilinear")}
    report = json.loads((Path(state.report or "") / REPORT).read_text())
    assert report["views"]["generation"] == {"current": 1.0}
    kinds = report["verdict"]["by_kind"]
    assert set(kinds) == {"real", "synthetic"} and kinds == state.by_kind
    assert sum(k["n"] for k in kinds.values()) == report["data"]["holdout"]
    for figures in kinds.values():
        assert figures["n"] > 0 and -1.0 <= figures["candidate"]["mcc"] <= 1.0
        assert 0.0 <= figures["candidate"]["accuracy"] <= 1.0 and 0.0 <= figures["serving"]["accuracy"] <= 1.0
    row = status_train_row({"enabled": True, "schedule": "0 3 * * *", "last": state.summary()})
    real, synthetic = kinds["real"], kinds["synthetic"]
    assert (
        f"by kind: real mcc {real['candidate']['mcc']:.3f} vs {real['serving']['mcc']:.3f}, "
        f"synthetic mcc {synthetic['candidate']['mcc']:.3f} vs {synthetic['serving']['mcc']:.3f}"
    ) in row

    # Mixing in January's validators extracts their views and keeps every current one.
    mixed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, generation="current:1, v0.2:1"))
    second = await TrainRun(mixed, worker, engine, "test").run()
    assert second.features["cached"] > 0 and second.features["extracted"] > 0 and second.features["pruned"] == 0
    with sqlite3.connect(cfg.state_dir / FEATURES_DB) as db:
        recipes = dict(db.execute("SELECT recipe, count(*) FROM views GROUP BY recipe").fetchall())
    v02 = "v0.2/aug1/squash-bilinear"
    assert recipes == {"current/squash-bilinear": state.features["views"], v02: second.features["extracted"]}
    await worker.run(engine.close)


async def test_a_head_trained_on_shuffled_labels_is_not_promoted(
    tmp_path: Path, tiny_engine: Path, shuffled_data: Path, worker: EngineWorker
) -> None:
    cfg = train_config(tmp_path, tiny_engine, shuffled_data)
    engine = await serving(worker, cfg)
    state = await TrainRun(cfg, worker, engine, "test").run()
    assert state.result == "rejected", state.summary()
    assert state.engine is None and sorted(p.name for p in cfg.engines_dir.iterdir()) == ["tiny"]
    assert abs((state.candidate or {})["mcc"]) < 0.3
    await worker.run(engine.close)


async def test_too_little_data_is_a_skipped_run_with_a_report(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, worker: EngineWorker
) -> None:
    cfg = train_config(tmp_path, tiny_engine, demo_data, min_images=10_000)
    engine = await serving(worker, cfg)
    state = await TrainRun(cfg, worker, engine, "test").run()
    assert state.result == "skipped" and "too little labelled data" in state.reason
    # A sentence, not a Python dict: the counts, the bound and the sources read.
    assert "{" not in state.reason and "at least 10000 training images (train.min_images)" in state.reason
    assert f"natix_parquet-0 ({demo_data}: 480 rows)" in state.reason
    assert json.loads((Path(state.report or "") / REPORT).read_text())["result"]["result"] == "skipped"
    await worker.run(engine.close)


async def test_a_run_while_another_holds_the_state_dir_is_skipped(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, worker: EngineWorker
) -> None:
    cfg = train_config(tmp_path, tiny_engine, demo_data, min_images=10_000)
    engine = await serving(worker, cfg)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    other, taken = try_flock(cfg.state_dir / LOCK)  # as a standalone `svd train run` would hold it
    assert taken
    busy = await TrainRun(cfg, worker, engine, "test").run()
    assert busy.result == "skipped" and "another training run holds" in busy.reason, busy.summary()
    other.close()
    # Released: the next run goes past the lock (and stops at the data, as min_images asks).
    state = await TrainRun(cfg, worker, engine, "test").run()
    assert state.result == "skipped" and "too little labelled data" in state.reason, state.summary()
    await worker.run(engine.close)


async def test_a_broken_image_fails_the_run_and_serving_goes_on(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, worker: EngineWorker
) -> None:
    folder = tmp_path / "folder"
    image_folder(folder, demo_data, 40, broken=7)
    cfg = make_config(
        tmp_path, tiny_engine, train={**TRAIN_SMALL, "sources": [{"kind": "image_folder", "path": str(folder)}]}
    )
    engine = await serving(worker, cfg)
    state = await TrainRun(cfg, worker, engine, "test").run()
    assert state.result == "failed" and state.engine is None, state.summary()
    assert json.loads((Path(state.report or "") / REPORT).read_text())["result"]["result"] == "failed"
    # The engine thread and the engine are as they were.
    out = await worker.call(engine.infer, np.full((2, 224, 224, 3), 90, np.uint8))
    assert out.probs.shape == (2,) and worker.errored is None
    await worker.run(engine.close)


async def test_a_cancelled_run_stops_its_job_and_writes_no_engine(
    tmp_path: Path, tiny_engine: Path, demo_data: Path, worker: EngineWorker
) -> None:
    cfg = train_config(tmp_path, tiny_engine, demo_data, slice_images=1)
    engine = await serving(worker, cfg)
    started = asyncio.Event()

    def progress(state: RunState) -> None:
        if state.stage == "features" and state.done > 0:
            started.set()

    run = TrainRun(cfg, worker, engine, "test", on_progress=progress)
    task = asyncio.create_task(run.run())
    await asyncio.wait_for(started.wait(), 120)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert run.state.result == "cancelled" and run.state.engine is None
    assert all(job.done for job in worker.jobs) and not worker.jobs
    assert sorted(p.name for p in cfg.engines_dir.iterdir()) == ["tiny"]
    history = read_history(cfg.train_dir)
    assert history[-1]["result"] == "cancelled"
    await worker.run(engine.close)
    shutil.rmtree(cfg.state_dir / "train")


def test_train_now_wait_says_a_line_only_when_something_changed() -> None:
    said = Said()
    run = {"stage": "features", "done": 0, "total": 200, "epochs": []}
    assert said.news(run) == ["stage features", "features 0/200 (0%)"]
    assert said.news({**run, "done": 15}) == []  # a poll that finds nothing new says nothing
    assert said.news({**run, "done": 45}) == ["features 45/200 (20%)"]
    epochs = [{"epoch": 1, "val_loss": 0.69}]
    fit = {"stage": "fit", "done": 2, "total": 100, "epochs": epochs}
    assert said.news(fit) == ["stage fit", "fit epoch 1: validation loss 0.6900"]
    epochs += [{"epoch": 2, "val_loss": 0.5}, {"epoch": 3, "val_loss": 0.4}]
    assert said.news(fit) == ["fit epoch 2: validation loss 0.5000", "fit epoch 3: validation loss 0.4000"]
    assert said.news(fit) == []
