"""The judge: a real bittensor 9.12.2 dendrite, in its own virtualenv, queries the daemon."""

import asyncio
import base64
import io
import struct
import zlib
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from svd.config import Config
from svd.engine.canary import street_jpegs
from svd.errors import Overloaded
from svd.serve.server import BodyBudget
from tests.bt9env import ensure_bt9_python, run_bt9_client
from tests.helpers import make_config, running_daemon
from tests.test_server import query

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


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of zeros: its header says width x height, its data is a few kB."""
    raw = zlib.compress(b"\0" * ((width + 7) // 8 + 1) * height, 9)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What today's validators send: native sizes, landscape and portrait, up to 24 MP, and a synthetic
    1024x1024 PNG re-encoded as JPEG 75 (protocol.md, "The validator of today")."""
    folder = tmp_path_factory.mktemp("native")
    sizes = {"dashcam": (1920, 1080), "portrait": (1080, 1920), "phone": (4032, 3024), "24mp": (6000, 4000)}
    for i, (name, size) in enumerate(sizes.items()):
        (folder / f"{i}-{name}.jpg").write_bytes(street_jpegs(1, seed=i, size=size)[0])
    png = io.BytesIO()
    Image.open(io.BytesIO(street_jpegs(1, seed=9, size=(1024, 1024))[0])).save(png, format="PNG")
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(png.getvalue())).convert("RGB").save(jpeg, format="JPEG")
    (folder / "4-synthetic.jpg").write_bytes(jpeg.getvalue())
    return folder


@pytest.mark.slow
async def test_real_dendrite_native_size_images_get_predictions(
    bt9_python: Path, config: Config, native_dir: Path
) -> None:
    async with running_daemon(config) as d:
        rows = await client(bt9_python, d.port, d.snapshot().hotkey, native_dir, "--route", "ImageSynapse")
        assert [r["image"] for r in rows] == sorted(p.name for p in native_dir.iterdir())
        for row in rows:
            assert row["status_code"] == 200, row
            assert 0.0 <= row["prediction"] <= 1.0
        snap = d.snapshot()
        assert snap.served == 5 and snap.decode_ms["count"] == 5


@pytest.mark.slow
async def test_real_dendrite_over_the_pixel_bound_and_a_bomb_are_refused_before_decoding(
    bt9_python: Path, config: Config, tmp_path: Path
) -> None:
    folder = tmp_path / "too-large"
    folder.mkdir()
    (folder / "30mp.jpg").write_bytes(street_jpegs(1, size=(6400, 4800))[0])  # 30.7 MP, a valid JPEG
    (folder / "bomb.png").write_bytes(png_bomb(8_000, 8_000))  # 64 MP (under PIL's own bomb bound) in a few kB
    async with running_daemon(config) as d:
        rows = await client(bt9_python, d.port, d.snapshot().hotkey, folder)
        assert [(r["image"], r["status_code"]) for r in rows] == [("30mp.jpg", 413), ("bomb.png", 413)]
        assert all(r["prediction"] == -1.0 for r in rows)
        # svd's own check of the header's size refused both (PIL's bomb check would say "bomb").
        assert "image has 6400x4800 pixels, more than 25000000" in rows[0]["status_message"]
        assert "image has 8000x8000 pixels, more than 25000000" in rows[1]["status_message"]
        assert d.snapshot().refused == {"too_large": 2}


def test_the_body_budget_bounds_the_total_and_each_caller() -> None:
    budget = BodyBudget(100, caller_share=0.5)
    assert budget.claim(40, "a") == 40 and budget.claim(10, "a") == 10
    with pytest.raises(Overloaded, match="50 by this caller"):  # a's half is used up
        budget.claim(1, "a")
    assert budget.claim(45, "b") == 45
    with pytest.raises(Overloaded, match="95 of 100 body bytes held"):  # the whole budget is
        budget.claim(6, "c")
    budget.release(40, "a")
    assert budget.claim(30, "a") == 30 and budget.held == 85 and budget.peak == 95
    for n, who in ((30, "a"), (10, "a"), (45, "b")):
        budget.release(n, who)
    assert budget.held == 0
    big = BodyBudget(100, caller_share=0.1)
    assert big.claim(60, "a") == 60  # a caller's first body fits whatever its share


@pytest.mark.slow
async def test_a_burst_of_large_bodies_gets_503s_while_a_validator_is_answered(
    bt9_python: Path, tmp_path: Path, tiny_engine: Path, native_dir: Path
) -> None:
    """One caller bursts 24 MP bodies far beyond the in-flight bound; a validator at its normal rate,
    through a real dendrite, gets every answer meanwhile."""
    cfg = make_config(tmp_path, tiny_engine, server={"max_inflight_body_bytes": 24_000_000})
    big = base64.b64encode((native_dir / "3-24mp.jpg").read_bytes()).decode()  # a 3.4 MB body
    statuses: Counter[int] = Counter()
    async with running_daemon(cfg) as d:
        hotkey = d.snapshot().hotkey
        done = asyncio.Event()

        async def burst() -> None:
            while not done.is_set():
                outcomes = await asyncio.gather(*(query(d.port, hotkey, big) for _ in range(24)))
                statuses.update(status for status, _, _ in outcomes)

        bursting = asyncio.create_task(burst())
        try:
            rows = await client(bt9_python, d.port, hotkey, native_dir, "--uri", "//Bob", "--route", "ImageSynapse")
        finally:
            done.set()
            await bursting
        assert [r["status_code"] for r in rows] == [200] * 5, rows
        assert set(statuses) == {200, 503} and statuses[503] > 0, statuses
        assert d.snapshot().failed == {"bodies_in_flight": statuses[503]}
