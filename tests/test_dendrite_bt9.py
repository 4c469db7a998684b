"""The judge: a real bittensor 9.12.2 dendrite, in its own virtualenv, queries the daemon."""

import asyncio
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from svd.config import Config
from svd.engine.canary import street_jpegs
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
