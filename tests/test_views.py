"""Training views are what validators send, as the engine sees it: the same pixels serving decodes."""

from __future__ import annotations

import base64
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from svd.config import ConfigError, config_from_dict, parse_generation
from svd.engine.preprocess import Preprocess
from svd.serve.decode import DecodeLimits, decode
from svd.train.augment import decode_jpeg, encode_jpeg, render_view
from svd.train.logged import SERVED
from svd.train.sources import REAL, SYNTHETIC, FileRef, Record, image_sha256
from svd.train.views import (
    AS_SERVED,
    CURRENT_SEED,
    draw_generation,
    plan_views,
    recipe,
    render_views,
    validator_jpeg,
)

LIMITS = DecodeLimits(16_000_000, 25_000_000, ("JPEG", "PNG", "WEBP"))
MAPPINGS = [Preprocess("squash"), Preprocess("letterbox"), Preprocess("center_crop", "bicubic")]


def scene(size: tuple[int, int], fmt: str, seed: int) -> bytes:
    from svd.train.demo_scenes import render

    im, _, _ = render(np.random.default_rng(seed), size[0], size[1], roadwork=bool(seed % 2))
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    """A dashcam JPEG, a portrait photo, a synthetic 1024 PNG: files, as an image-folder source has them."""
    folder = tmp_path_factory.mktemp("sources")
    out = []
    for i, (size, fmt, origin) in enumerate(
        [((1920, 1080), "JPEG", REAL), ((1080, 1920), "JPEG", REAL), ((1024, 1024), "PNG", SYNTHETIC)]
    ):
        data = scene(size, fmt, i)
        path = folder / f"{i}.{fmt.lower()}"
        path.write_bytes(data)
        out.append(Record(image_sha256(data), i % 2, "folder", origin, FileRef(path)))
    return out


def served(data: bytes, p: Preprocess) -> np.ndarray:
    """What the daemon feeds the engine for these bytes: its own decode, base64 and all."""
    return decode(base64.b64encode(data).decode(), LIMITS, p).pixels


@pytest.mark.parametrize("p", MAPPINGS, ids=lambda p: p.key)
def test_a_current_view_is_what_serving_decodes_from_what_the_validator_sends(
    records: list[Record], p: Preprocess
) -> None:
    views = plan_views(records, 4, "t", parse_generation("current"), p)
    assert [(v.seed, v.recipe) for v in views] == [(CURRENT_SEED, f"current/{p.key}")] * 3
    pixels = render_views(views, p)
    for record, got in zip(records, pixels, strict=True):
        sent = validator_jpeg(record.ref.read())
        assert np.array_equal(got, served(sent, p))


@pytest.mark.parametrize("p", MAPPINGS, ids=lambda p: p.key)
def test_a_v02_view_and_an_as_served_view_are_what_serving_decodes(records: list[Record], p: Preprocess) -> None:
    views = plan_views(records, 2, "t", parse_generation("v0.2"), p)
    pixels = render_views(views, p)
    for view, got in zip(views, pixels, strict=True):
        source = decode_jpeg(encode_jpeg(np.asarray(Image.open(view.record.ref.path).convert("RGB"))))  # type: ignore[attr-defined]
        if view.record.origin == SYNTHETIC:  # PNGs are not re-saved before the distortions
            source = np.asarray(Image.open(view.record.ref.path).convert("RGB"))  # type: ignore[attr-defined]
        assert np.array_equal(got, served(render_view(source, view.seed).jpeg, p))
    logged = Record(records[0].sha256, 1, "samples", SERVED, records[0].ref)
    (as_served,) = plan_views([logged], 4, "t", parse_generation("current"), p)
    assert as_served.seed == AS_SERVED
    assert np.array_equal(render_views([as_served], p)[0], served(records[0].ref.read(), p))


def test_what_the_validator_sends_is_jpeg_75_at_native_size_twice_for_photos_once_for_pngs(
    records: list[Record],
) -> None:
    photo, _, png = (r.ref.read() for r in records)
    sent = validator_jpeg(photo)
    with Image.open(io.BytesIO(sent)) as im:
        assert im.format == "JPEG" and im.size == (1920, 1080)
    once = encode_jpeg(np.asarray(Image.open(io.BytesIO(photo)).convert("RGB")))
    assert sent == encode_jpeg(decode_jpeg(once)) and sent != once
    assert validator_jpeg(png) == encode_jpeg(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))


def test_a_mix_draws_each_seed_s_generation_by_its_weight(records: list[Record]) -> None:
    mix = parse_generation("current:3, v0.2:1")
    assert mix == (("current", 0.75), ("v0.2", 0.25))
    drawn = Counter(draw_generation(seed, mix) for seed in range(4000))
    assert 0.72 < drawn["current"] / 4000 < 0.78
    assert all(draw_generation(s, mix) == draw_generation(s, mix) for s in range(50))
    p = Preprocess()
    views = plan_views(records * 50, 4, "t", mix, p)
    kinds = Counter(v.recipe for v in views)
    assert set(kinds) == {recipe("current", p), recipe("v0.2", p)} and len(views) == 600
    assert 0.65 < kinds[recipe("current", p)] / 600 < 0.85
    # Every current draw of an image is its one view; v0.2 views have seeds of their own.
    assert {v.seed for v in views if v.recipe == recipe("current", p)} == {CURRENT_SEED}


def test_the_generation_setting_is_checked() -> None:
    assert parse_generation("v0.2") == (("v0.2", 1.0),)
    assert parse_generation(" v0.2 : 1 , current : 1 ") == (("current", 0.5), ("v0.2", 0.5))
    for bad in ("", "v0.3", "current:x", "current:-1", "current:0", "current, current"):
        with pytest.raises(ValueError):
            parse_generation(bad)
        with pytest.raises(ConfigError, match=r"train\.generation"):
            config_from_dict({"train": {"generation": bad}}, base_dir=Path("."))
