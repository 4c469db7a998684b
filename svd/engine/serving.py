"""The serving engine: its one holder, and the one procedure that readies an engine to serve.

Start-up and hot swap both go through prepare_engine(): verify (hashing in a
plain thread), load on the engine worker (or share the serving engine's
backbone), warm up at each configured batch size, check the canary images;
each step is its own job on the worker's inference lane, so validator
batches run between the steps. ServingEngine holds the engine that serves:
the batcher reads it once per batch, hot swap replaces it between batches,
and shutdown closes whichever serves last.
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import structlog

from svd.config import EngineConfig
from svd.engine.canary import canary_images
from svd.engine.load import Engine, load_engine, newest_engine
from svd.engine.manifest import MANIFEST_NAME, EngineError, Manifest, verify_engine_dir
from svd.engine.worker import EngineWorker

log = structlog.get_logger(__name__)

CANARY_IMAGES = 4


class ServingEngine:
    """Holds the engine that serves. Read `engine` once per batch so a batch runs on one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def replace(self, new: Engine) -> Engine:
        """Serve `new` from the next batch on; returns the engine it replaces (the caller closes it)."""
        old, self.engine = self.engine, new
        return old


def engine_to_serve(cfg: EngineConfig, engines_dir: Path) -> Path:
    """The engine to start with: [engine] name when set, else the newest in engines/, else a demo built there.

    Raises:
        EngineError: the named engine is missing, or engines/ is empty and building a demo is off.
    """
    if cfg.name:
        path = engines_dir / cfg.name
        if not (path / MANIFEST_NAME).is_file():
            raise EngineError(f"engine.name: no engine {cfg.name!r} in {engines_dir}")
        return path
    newest = newest_engine(engines_dir)
    if newest is not None:
        return newest
    if not cfg.build_demo_if_empty:
        raise EngineError(f"no engine in {engines_dir}: run `svd build-engine --demo` or copy one there")
    from svd.engine.build import build_demo_engine  # torch export tooling, only needed here

    log.info("building_demo_engine", dir=str(engines_dir))
    return build_demo_engine(engines_dir)


def canary_check(engine: Engine) -> None:
    """Raises EngineOutputError unless the engine gives a finite probability in [0, 1] per canary image.

    Engine.infer() itself checks shapes, finiteness and range; the canary feeds it
    varied, fixed images (warm-up feeds blank ones).
    """
    engine.infer(canary_images(CANARY_IMAGES))


async def prepare_engine(
    worker: EngineWorker,
    path: Path,
    cfg: EngineConfig,
    *,
    manifest: Manifest | None = None,
    reuse: Engine | None = None,
) -> Engine:
    """Verify, load, warm up and canary-check the engine at `path`; closed again if a step fails.

    Args:
        worker: the engine worker; every step touching the engine runs on its inference lane.
        path: the engine directory.
        cfg: backend, threads and warm-up batch sizes.
        manifest: verify_engine_dir(path)'s result when the caller already has it.
        reuse: the serving engine; a new engine with its backbone (same backbone_sha256)
            shares the loaded, warm backend, so only the head loads and only the canary runs.

    Raises:
        EngineError, or whatever the runtime raises for a bad engine.
    """
    if manifest is None:
        manifest = await asyncio.to_thread(verify_engine_dir, path)
    load = functools.partial(
        load_engine, path, backend=cfg.backend, threads=cfg.threads, manifest=manifest, reuse=reuse, spin=cfg.onnx_spin
    )
    engine = await worker.run(load)
    try:
        if not engine.backbone_reused:
            for batch_size in cfg.warmup_batch_sizes:
                await worker.run(engine.warmup, (batch_size,))
        await worker.run(canary_check, engine)
    except BaseException:
        await worker.run(engine.close)
        raise
    return engine
