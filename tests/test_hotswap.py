"""Hot swap through a running daemon: real watchfiles events, real engines, signed queries."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save

from svd.config import Config
from svd.control import call
from svd.engine.build import build_demo_engine, write_head_engine
from svd.engine.canary import canary_images
from svd.engine.head import Head
from svd.engine.manifest import BACKBONE_ONNX, HEAD, MANIFEST_NAME, InputSpec, read_manifest, utc_now
from svd.engine.model import tiny_dinov3_config
from svd.tools.swapbench import copy_engine
from tests.helpers import make_config, running_daemon
from tests.test_server import query

WAIT_S = 20.0


def make_oldest(engine: Path) -> None:
    """Backdates an engine by a day (manifest.json is not hashed), whenever the fixture built it."""
    old = dataclasses.replace(read_manifest(engine), created=utc_now() - timedelta(days=1))
    (engine / MANIFEST_NAME).write_text(old.to_json())


def rename_in(staging: Path, engines: Path) -> None:
    os.rename(staging, engines / staging.name)


async def status(cfg: Config) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(call, cfg.socket_path, "status")
    return result


async def command(cfg: Config, cmd: str, **args: str) -> dict[str, Any]:
    result: dict[str, Any] = await asyncio.to_thread(call, cfg.socket_path, cmd, 60.0, **args)
    return result


async def wait_for(cfg: Config, ok: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll `svd status` until ok(engine field) holds, up to WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while True:
        engine: dict[str, Any] = (await status(cfg))["engine"]
        if ok(engine):
            return engine
        assert time.monotonic() < deadline, f"status never changed as expected: {engine}"
        await asyncio.sleep(0.05)


def refused(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: (e["last_refusal"] or {}).get("name") == name


async def query_loop(port: int, miner: str, image: str, stop: asyncio.Event) -> list[int]:
    codes = []
    while not stop.is_set():
        codes.append((await query(port, miner, image))[0])
    return codes


@pytest.fixture
def cfg(tmp_path: Path, tiny_engine: Path) -> Config:
    base = make_config(tmp_path, tiny_engine)  # its `engine` argument is the engine to copy
    return dataclasses.replace(base, engine=dataclasses.replace(base.engine, watch_debounce_ms=50))


async def test_newer_engine_is_swapped_in_without_failing_a_query(cfg: Config, jpegs_b64: list[str]) -> None:
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        stop = asyncio.Event()
        load = [asyncio.create_task(query_loop(d.port, miner, j, stop)) for j in jpegs_b64[:4]]
        await asyncio.sleep(0)
        await asyncio.to_thread(copy_engine, cfg.engines_dir / "tiny", cfg.engines_dir, "newer")
        engine = await wait_for(cfg, lambda e: e["name"] == "newer")
        # A few more rounds on the new engine before stopping the load.
        served, deadline = d.snapshot().served, time.monotonic() + WAIT_S
        while d.snapshot().served < served + 8 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stop.set()
        codes = [c for task in load for c in await task]
        assert codes and set(codes) == {200}
        assert engine["swaps"] == 1 and engine["pinned"] is False and engine["last_refusal"] is None
        assert d.serving is not None and d.serving.engine.name == "newer"
        assert (cfg.engines_dir / "tiny").is_dir()  # old engines stay for rollback


def _nan_head(tiny: Path) -> bytes:
    state = load_file(str(tiny / HEAD))
    key = next(k for k in state if k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    return save(state)


def _staged(tiny: Path, staging: Path, name: str, fault: Callable[[Path], None]) -> Callable[[], None]:
    def write() -> None:
        fault(copy_engine(tiny, staging, name))
        rename_in(staging / name, tiny.parent)

    return write


async def test_bad_engines_are_refused_and_the_old_one_keeps_serving(cfg: Config, jpegs_b64: list[str]) -> None:
    tiny, engines, staging = cfg.engines_dir / "tiny", cfg.engines_dir, cfg.base_dir / "staging"
    onnx = (tiny / BACKBONE_ONNX).read_bytes()
    bad: list[tuple[str, Callable[[], Any], str]] = [
        ("broken-manifest", _staged(tiny, staging, "broken-manifest", _write_garbage_manifest), "manifest"),
        ("flipped-byte", _staged(tiny, staging, "flipped-byte", _flip_head_byte), "sha256 mismatch"),
        ("big-input", lambda: copy_engine(tiny, engines, "big-input", input=InputSpec(height=256)), "input spec"),
        ("cut-onnx", lambda: copy_engine(tiny, engines, "cut-onnx", parts={BACKBONE_ONNX: onnx[:1000]}), "ONNX"),
        ("nan-head", lambda: copy_engine(tiny, engines, "nan-head", parts={HEAD: _nan_head(tiny)}), "[0, 1]"),
    ]
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        for name, write, why in bad:
            await asyncio.to_thread(write)
            engine = await wait_for(cfg, refused(name))
            assert why in engine["last_refusal"]["error"]
            assert engine["name"] == "tiny" and engine["swaps"] == 0
            assert (await query(d.port, miner, jpegs_b64[0]))[0] == 200


def _write_garbage_manifest(engine: Path) -> None:
    (engine / MANIFEST_NAME).write_text("{not json")


def _flip_head_byte(engine: Path) -> None:
    data = bytearray((engine / HEAD).read_bytes())
    data[-1] ^= 0xFF
    (engine / HEAD).write_bytes(bytes(data))


async def test_rollback_and_pinned_swap(cfg: Config, jpegs_b64: list[str]) -> None:
    tiny = cfg.engines_dir / "tiny"
    make_oldest(tiny)
    copy_engine(tiny, cfg.engines_dir, "mid", age_s=2)
    copy_engine(tiny, cfg.engines_dir, "new", age_s=1)
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        assert (await status(cfg))["engine"]["name"] == "new"
        for expected in ("mid", "tiny"):
            engine = await command(cfg, "rollback")
            assert engine["name"] == expected and engine["pinned"] is True
            assert (await query(d.port, miner, jpegs_b64[0]))[0] == 200
        with pytest.raises(RuntimeError, match="no engine to roll back to from tiny"):
            await command(cfg, "rollback")
        engine = await command(cfg, "swap", name="mid")
        assert engine["name"] == "mid" and engine["pinned"] is True and engine["swaps"] == 3
        with pytest.raises(RuntimeError, match=r"no engine 'nope' in .* \(engines there: mid, new, tiny\)"):
            await command(cfg, "swap", name="nope")
        # Pinned: a newer good engine is not swapped in. Events are handled in order,
        # so once the bad one after it is refused, the good one has been seen.
        await asyncio.to_thread(copy_engine, tiny, cfg.engines_dir, "newest")
        await asyncio.to_thread(copy_engine, tiny, cfg.engines_dir, "zz-bad", input=InputSpec(width=100))
        engine = await wait_for(cfg, refused("zz-bad"))
        assert engine["name"] == "mid" and engine["swaps"] == 3
        assert (await query(d.port, miner, jpegs_b64[0]))[0] == 200
        # Unpinned, it serves the newest (trained) engine on disk again, not only the next one to arrive.
        engine = await command(cfg, "unpin")
        assert engine["name"] == "newest" and engine["pinned"] is False and engine["swaps"] == 4
        assert (await query(d.port, miner, jpegs_b64[0]))[0] == 200


async def test_swap_to_a_bad_engine_is_refused(cfg: Config) -> None:
    copy_engine(cfg.engines_dir / "tiny", cfg.engines_dir, "old-bad", age_s=2 * 86_400, input=InputSpec(channels=1))
    async with running_daemon(cfg):
        with pytest.raises(RuntimeError, match="engine 'old-bad' refused"):
            await command(cfg, "swap", name="old-bad")
        engine = (await status(cfg))["engine"]
        assert engine["name"] == "tiny" and engine["pinned"] is False
        assert engine["last_refusal"]["name"] == "old-bad"


def test_cli_swap_without_a_daemon_says_so(cfg: Config, capsys: pytest.CaptureFixture[str]) -> None:
    from svd.cli import _engine_command

    assert _engine_command(cfg, "rollback") == 1
    assert "no daemon answers" in capsys.readouterr().err


def _shifted_head(tiny: Path) -> Head:
    """The same head with another fusion bias: other probabilities, same backbone."""
    state = load_file(str(tiny / HEAD))
    state["fusion.bias"] = state["fusion.bias"] + 3.0
    return Head.from_state(state)


async def test_new_head_on_the_serving_backbone_reuses_it(cfg: Config, jpegs_b64: list[str]) -> None:
    tiny = cfg.engines_dir / "tiny"
    async with running_daemon(cfg) as d:
        miner = d.snapshot().hotkey
        old = d.serving.engine  # type: ignore[union-attr]
        assert old is not None
        before = await query(d.port, miner, jpegs_b64[0])
        await asyncio.to_thread(write_head_engine, tiny, cfg.engines_dir / "new-head", _shifted_head(tiny), version="2")
        await wait_for(cfg, lambda e: e["name"] == "new-head")
        new = d.serving.engine  # type: ignore[union-attr]
        assert new is not None and new is not old and new.backbone_reused
        assert new.shared_backend is old.shared_backend and not new.shared_backend.closed
        # The old engine was closed on the worker; the shared backend still serves the new one.
        await asyncio.sleep(0.1)
        with pytest.raises(RuntimeError, match="used after close"):
            old.infer(canary_images(1))
        after = await query(d.port, miner, jpegs_b64[0])
        assert before[0] == after[0] == 200
        assert after[1]["prediction"] != pytest.approx(before[1]["prediction"], abs=1e-3)
    assert new.shared_backend.closed  # the daemon's shutdown closed the last user


async def test_new_backbone_is_loaded_not_reused(cfg: Config, tiny_engine: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-build"
    build_demo_engine(other, "other", seed=9, config=tiny_dinov3_config(hidden_size=64, num_layers=2, num_heads=2))
    async with running_daemon(cfg) as d:
        old = d.serving.engine  # type: ignore[union-attr]
        await asyncio.to_thread(copy_engine, other / "other", cfg.engines_dir, "other")
        await wait_for(cfg, lambda e: e["name"] == "other")
        new = d.serving.engine  # type: ignore[union-attr]
        assert new is not None and old is not None
        assert not new.backbone_reused and new.shared_backend is not old.shared_backend
        assert old.shared_backend.closed


async def test_rollback_returns_to_the_engine_served_before_past_a_refused_one(cfg: Config) -> None:
    tiny, engines = cfg.engines_dir / "tiny", cfg.engines_dir
    onnx = (tiny / BACKBONE_ONNX).read_bytes()
    async with running_daemon(cfg):
        await asyncio.to_thread(copy_engine, tiny, engines, "a")
        await wait_for(cfg, lambda e: e["name"] == "a")
        await asyncio.to_thread(copy_engine, tiny, engines, "b-cut", parts={BACKBONE_ONNX: onnx[:1000]})
        await wait_for(cfg, refused("b-cut"))
        await asyncio.to_thread(copy_engine, tiny, engines, "c")
        await wait_for(cfg, lambda e: e["name"] == "c")
        # b-cut is the newest engine older than c on disk, but it was refused: a is what served.
        assert (await command(cfg, "rollback"))["name"] == "a"
        assert (await command(cfg, "rollback"))["name"] == "tiny"


async def test_rollback_after_restart_skips_an_engine_that_fails_to_load(cfg: Config) -> None:
    tiny, engines = cfg.engines_dir / "tiny", cfg.engines_dir
    onnx = (tiny / BACKBONE_ONNX).read_bytes()
    make_oldest(tiny)
    copy_engine(tiny, engines, "b-cut", age_s=2, parts={BACKBONE_ONNX: onnx[:1000]})
    copy_engine(tiny, engines, "c", age_s=1)
    async with running_daemon(cfg):  # no history: rollback goes by the engines on disk
        engine = await command(cfg, "rollback")
        assert engine["name"] == "tiny" and engine["last_refusal"]["name"] == "b-cut"


async def test_old_engines_beyond_keep_are_pruned_after_a_swap(cfg: Config) -> None:
    tiny, engines = cfg.engines_dir / "tiny", cfg.engines_dir
    for i, name in enumerate(("e1", "e2", "e3")):
        copy_engine(tiny, engines, name, age_s=3 - i)
    make_oldest(tiny)
    kept = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, keep=2))
    async with running_daemon(kept):  # serves e3, the newest; nothing is pruned at start
        assert sorted(p.name for p in engines.iterdir()) == ["e1", "e2", "e3", "tiny"]
        await asyncio.to_thread(copy_engine, tiny, engines, "e4")
        await wait_for(kept, lambda e: e["name"] == "e4")
        # The serving engine and the two newest others stay; the older ones go (pruning
        # follows the swap, after the old engine is closed on the worker).
        deadline = time.monotonic() + WAIT_S
        while (names := sorted(p.name for p in engines.iterdir())) != ["e2", "e3", "e4"]:
            assert time.monotonic() < deadline, names
            await asyncio.sleep(0.02)
