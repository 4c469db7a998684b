"""The judge: a real bittensor 9.12.2 dendrite, in its own virtualenv, queries the daemon."""

import asyncio
from pathlib import Path

import pytest

from svd.config import Config
from tests.bt9env import ensure_bt9_python, run_bt9_client
from tests.helpers import running_daemon

CACHE = Path(__file__).resolve().parents[1] / ".cache"


@pytest.fixture(scope="module")
def bt9_python() -> Path:
    return ensure_bt9_python(CACHE)


@pytest.fixture
def image_dir(tmp_path: Path, jpegs: list[bytes]) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, blob in enumerate(jpegs[:6]):
        (folder / f"street{i}.jpg").write_bytes(blob)
    return folder


async def client(python: Path, port: int, hotkey: str, images: Path, *args: str) -> list[dict]:
    argv = ("--port", str(port), "--axon-hotkey", hotkey, "--images", str(images), *args)
    return await asyncio.to_thread(run_bt9_client, python, *argv, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("route", ["ImageSynapse", "ExtendedImageSynapse"])
async def test_real_dendrite_gets_predictions(bt9_python: Path, config: Config, image_dir: Path, route: str) -> None:
    async with running_daemon(config) as d:
        rows = await client(bt9_python, d.port, d.snapshot().hotkey, image_dir, "--route", route)
        assert len(rows) == 6
        for row in rows:
            assert row["status_code"] == 200, row
            assert row["is_success"] is True
            assert 0.0 <= row["prediction"] <= 1.0
            assert row["axon_process_time"] > 0
        assert d.snapshot().served == 6


@pytest.mark.slow
@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        ("empty-signature", "empty_signature"),
        ("missing-signature", "empty_signature"),
        ("bad-signature", "bad_signature"),
        ("foreign-receiver", "foreign_receiver"),
    ],
)
async def test_real_dendrite_forgeries_are_refused(
    bt9_python: Path, config: Config, image_dir: Path, tamper: str, reason: str
) -> None:
    async with running_daemon(config) as d:
        rows = await client(bt9_python, d.port, d.snapshot().hotkey, image_dir, "--tamper", tamper)
        assert [r["status_code"] for r in rows] == [401] * 6
        assert all(r["prediction"] == -1.0 and r["is_success"] is False for r in rows)
        snap = d.snapshot()
        assert snap.served == 0 and snap.refused == {reason: 6}


@pytest.mark.slow
async def test_real_dendrite_replay_is_refused(bt9_python: Path, config: Config, image_dir: Path) -> None:
    async with running_daemon(config) as d:
        rows = await client(bt9_python, d.port, d.snapshot().hotkey, image_dir, "--tamper", "replay")
        assert [(r["attempt"], r["status_code"]) for r in rows] == [(1, 200), (2, 401)] * 6
        assert d.snapshot().refused == {"replayed_nonce": 6}
