"""Ten swaps in a row under steady signed load, then a rollback: nothing fails, bad engines are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from svd.config import Config
from svd.tools.swapbench import STAGING, SWAPS, run_swaps, sequence
from tests.helpers import make_config, running_daemon


@pytest.fixture(scope="module")
def other_backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny engine whose backbone differs from tiny_engine's (another seed)."""
    from svd.engine.build import build_demo_engine
    from svd.engine.model import tiny_dinov3_config

    engines = tmp_path_factory.mktemp("other")
    return build_demo_engine(engines, name="other", seed=7, config=tiny_dinov3_config(64, 2, 2))


@pytest.fixture
def cfg(tmp_path: Path, tiny_engine: Path) -> Config:
    base = make_config(tmp_path, tiny_engine)
    return dataclasses.replace(base, engine=dataclasses.replace(base.engine, watch_debounce_ms=50, keep=0))


def test_sequence_has_ten_swaps_with_each_bad_kind(tiny_engine: Path, other_backbone: Path) -> None:
    cands = sequence(tiny_engine, other_backbone, "t")
    assert len(cands) == SWAPS and sum(c.good for c in cands) == 6
    assert {c.kind for c in cands if not c.good} == {"corrupt-file", "hash-mismatch", "wrong-input", "truncated-onnx"}
    assert [c.kind for c in cands if c.good] == ["head only", "new backbone", "head only"] * 2
    assert sum(c.kind == "head only" for c in sequence(tiny_engine, None, "t")) == 6


async def test_ten_swaps_under_load_fail_nothing(cfg: Config, other_backbone: Path, jpegs_b64: list[str]) -> None:
    async with running_daemon(cfg) as d:
        figures = await run_swaps(
            url=f"http://127.0.0.1:{d.port}/ImageSynapse",
            miner=d.snapshot().hotkey,
            socket_path=cfg.socket_path,
            engines_dir=cfg.engines_dir,
            images=jpegs_b64,
            other=other_backbone,
            concurrency=4,
            settle_s=0.3,
        )
        steps = figures["steps"]
        assert [s["outcome"].split(":")[0] for s in steps[:10]] == [
            "swapped" if i in (0, 2, 4, 6, 8, 9) else "refused" for i in range(10)
        ], steps
        assert steps[10]["kind"] == "rollback" and steps[10]["outcome"].endswith("-good5")
        assert figures["all_as_expected"] is True
        # Zero failed or dropped: every request sent got a 200.
        assert figures["failed"] == 0 and figures["statuses"] == {"200": figures["requests"]}
        assert figures["in_swap_windows"] > 0 and figures["longest_pause_ms"] > 0
        assert max(s["max_ms"] for s in steps) == figures["longest_pause_ms"]
        # Afterwards the original engine serves again, unpinned, and the run's engines are gone.
        engine = d.snapshot().to_dict()["engine"]
        assert engine["name"] == "tiny" and engine["pinned"] is False
        assert sorted(p.name for p in cfg.engines_dir.iterdir()) == ["tiny"]
        assert not (cfg.engines_dir / STAGING).exists()
