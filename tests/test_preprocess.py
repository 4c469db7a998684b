"""The engine's mapping from an encoded image to its input, and what serving does with it."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svd.engine.load import load_engine
from svd.engine.manifest import MANIFEST_NAME, EngineError, Manifest, read_manifest
from svd.engine.preprocess import LEGACY, Preprocess, center_square, map_bytes, to_input
from svd.serve.batcher import Item, _infer
from svd.serve.decode import DecodeLimits, decode
from tests.helpers import FakeEngine, make_config, running_daemon
from tests.test_server import query

LIMITS = DecodeLimits(16_000_000, 25_000_000, ("JPEG", "PNG", "WEBP"))


def encoded(size: tuple[int, int], fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A smooth colour field (gradients, so every mapping gives a different picture) at `size`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def before_the_mapping(data: bytes) -> np.ndarray:
    """What svd's decode did before engines named a mapping, written out again as the reference."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG":
            im.draft("RGB", (224, 224))
        rgb = im.convert("RGB")
    if rgb.size != (224, 224):
        rgb = rgb.resize((224, 224), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


@pytest.mark.parametrize(
    ("size", "fmt"),
    [((224, 224), "JPEG"), ((1920, 1080), "JPEG"), ((1080, 1920), "JPEG"), ((1001, 777), "JPEG"),
     ((4032, 3024), "JPEG"), ((1024, 1024), "PNG"), ((300, 200), "WEBP")],
)  # fmt: skip
def test_legacy_is_what_decode_always_did(size: tuple[int, int], fmt: str) -> None:
    data = encoded(size, fmt)
    assert np.array_equal(map_bytes(data, LEGACY), before_the_mapping(data))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale() -> None:
    data = encoded((4032, 3024))
    for p, reduced in ((Preprocess("squash"), (504, 378)), (Preprocess("letterbox"), (504, 378))):
        with Image.open(io.BytesIO(data)) as im:
            out = to_input(im, p)
            assert im.size == reduced  # 1/8: both sides still cover what the mapping resamples to
        with Image.open(io.BytesIO(data)) as im:
            full = to_input(im, Preprocess(p.mapping, draft=False))
            assert im.size == (4032, 3024)
        # Same picture, a few grey levels apart at most.
        assert np.abs(out.astype(int) - full.astype(int)).mean() < 2.0
    # center_crop keeps the centred 3024 square: a 1/8 decode is 378 wide, still >= 224.
    with Image.open(io.BytesIO(data)) as im:
        to_input(im, Preprocess("center_crop"))
        assert im.size == (504, 378)


def test_letterbox_keeps_the_aspect_with_black_bars() -> None:
    portrait = Image.new("RGB", (1080, 1920), (200, 150, 100))
    out = to_input(portrait, Preprocess("letterbox"))
    # 1080x1920 fits as 126x224, centred: 49 black columns each side.
    assert out.shape == (224, 224, 3)
    assert (out[:, :49] == 0).all() and (out[:, -49:] == 0).all()
    assert (np.abs(out[:, 50:-50].astype(int) - (200, 150, 100)) <= 1).all()
    landscape = to_input(Image.new("RGB", (1920, 1080), (200, 150, 100)), Preprocess("letterbox"))
    assert (landscape[:49] == 0).all() and (landscape[-49:] == 0).all()


def test_center_crop_keeps_only_the_middle_square() -> None:
    im = Image.new("RGB", (300, 100), (255, 0, 0))
    im.paste((0, 0, 255), (100, 0, 200, 100))  # the middle third blue
    out = to_input(im, Preprocess("center_crop"))
    assert (out[..., 2] > 250).all() and (out[..., 0] < 5).all()
    assert center_square(300, 100) == (100, 0, 200, 100)
    squashed = to_input(im, Preprocess("squash"))
    assert squashed[:, :60, 0].min() > 250  # squash keeps the red sides


def test_mappings_differ_and_bicubic_is_not_bilinear() -> None:
    data = encoded((1920, 1080))
    outs = {p.key: map_bytes(data, p) for p in (Preprocess(m) for m in ("squash", "letterbox", "center_crop"))}
    keys = list(outs)
    assert all(not np.array_equal(outs[a], outs[b]) for a in keys for b in keys if a < b)
    assert not np.array_equal(map_bytes(data, Preprocess("squash", "bicubic")), outs["squash-bilinear"])
    with pytest.raises(ValueError, match="mapping must be one of"):
        Preprocess("stretch")
    with pytest.raises(ValueError, match="resample must be one of"):
        Preprocess("squash", "nearest")


def test_the_manifest_records_the_mapping_and_old_ones_get_legacy(tiny_engine: Path) -> None:
    manifest = read_manifest(tiny_engine)
    data = json.loads(manifest.to_json())
    assert data["preprocess"] == {"mapping": "squash", "resample": "bilinear", "draft": True}
    data["preprocess"] = {"mapping": "letterbox", "resample": "bicubic", "draft": False}
    assert Manifest.from_json(json.dumps(data)).preprocess == Preprocess("letterbox", "bicubic", draft=False)
    del data["preprocess"]
    assert Manifest.from_json(json.dumps(data)).preprocess == LEGACY
    for bad, match in (({"mapping": "stretch"}, "mapping must be one of"), ({"draft": "yes"}, "must be bool"),
                       ({"size": 384}, "unknown keys")):  # fmt: skip
        with pytest.raises(EngineError, match=match):
            Manifest.from_json(json.dumps({**data, "preprocess": bad}))


async def test_a_swap_that_changes_the_mapping_maps_queued_images_again() -> None:
    """An image decoded for the previous engine reaches the new one in the new engine's mapping."""
    portrait = encoded((1080, 1920))
    b64 = base64.b64encode(portrait).decode()
    decoded = decode(b64, LIMITS, LEGACY)
    engine = FakeEngine()
    engine.preprocess = Preprocess("letterbox")
    loop = asyncio.get_running_loop()
    item = Item((0.0, 0.0, 0), decoded.pixels, 1e9, loop.create_future(), decoded)
    out = _infer(engine, [item])
    # FakeEngine answers the first pixel / 255: black (a bar) in a letterboxed portrait.
    assert out.probs[0] == 0.0 and decoded.pixels[0, 0, 0] > 0
    engine.preprocess = LEGACY
    assert out.probs[0] != _infer(engine, [item]).probs[0]


def serve_bytes() -> list[bytes]:
    return [encoded((1920, 1080), seed=1), encoded((1080, 1920), seed=2), encoded((4032, 3024), seed=3),
            encoded((1024, 1024), "PNG", seed=4), encoded((224, 224), seed=5)]  # fmt: skip


@pytest.mark.parametrize("mapping", ["legacy", "letterbox"])
async def test_served_probabilities_are_the_engine_on_its_mapping(
    tmp_path: Path, tiny_engine: Path, mapping: str
) -> None:
    """An engine written before the mapping existed serves exactly as before; a letterbox one is letterboxed."""
    engines = tmp_path / "engines"
    shutil.copytree(tiny_engine, engines / "tiny")
    data = json.loads((engines / "tiny" / MANIFEST_NAME).read_text())
    if mapping == "legacy":
        del data["preprocess"]
    else:
        data["preprocess"]["mapping"] = "letterbox"
    (engines / "tiny" / MANIFEST_NAME).write_text(json.dumps(data))
    cfg = make_config(tmp_path)
    reference = load_engine(engines / "tiny", backend="onnx")
    try:
        async with running_daemon(cfg) as d:
            for blob in serve_bytes():
                status, body, _ = await query(d.port, d.snapshot().hotkey, base64.b64encode(blob).decode())
                assert status == 200, body
                pixels = before_the_mapping(blob) if mapping == "legacy" else map_bytes(blob, Preprocess("letterbox"))
                expected = float(reference.infer(pixels[None]).probs[0])
                assert body["prediction"] == pytest.approx(expected, abs=1e-6)
    finally:
        reference.close()
