import base64
import io

import numpy as np
import pytest
from PIL import Image

from svd.config import DecodeConfig
from svd.engine.canary import street_jpegs
from svd.errors import BadRequest, PayloadTooLarge
from svd.serve.decode import DecodeLimits, decode_image

LIMITS = DecodeLimits(DecodeConfig.max_image_bytes, 2048 * 2048, ("JPEG", "PNG", "WEBP"))


def encode(im: Image.Image, fmt: str = "JPEG", **kw: object) -> str:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return base64.b64encode(buf.getvalue()).decode()


def test_jpeg_224_decodes_to_rgb_uint8(jpegs_b64: list[str]) -> None:
    arr = decode_image(jpegs_b64[0], LIMITS)
    assert arr.shape == (224, 224, 3)
    assert arr.dtype == np.uint8
    assert 30 < arr.mean() < 230


def test_pixels_survive_a_lossless_round_trip() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode(Image.fromarray(pixels), "PNG"), LIMITS), pixels)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode: str) -> None:
    im = Image.new(mode, (224, 224))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(im, fmt), LIMITS).shape == (224, 224, 3)


@pytest.mark.parametrize("size", [(640, 480), (100, 50), (224, 300)])
def test_other_sizes_are_resized(size: tuple[int, int]) -> None:
    assert decode_image(encode(Image.new("RGB", size, "red")), LIMITS).shape == (224, 224, 3)


def test_webp_is_accepted() -> None:
    assert decode_image(encode(Image.new("RGB", (224, 224), "blue"), "WEBP"), LIMITS)[0, 0, 2] > 200


@pytest.mark.parametrize(
    ("b64", "message"),
    [
        ("", "field image is empty"),
        ("not base64!!", "not valid base64"),
        ("QUJD", "is not one of JPEG, PNG, WEBP"),  # "ABC"
        (base64.b64encode(b"GIF89a" + b"\0" * 64).decode(), "is not one of"),
    ],
)
def test_garbage_is_a_bad_request(b64: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        decode_image(b64, LIMITS)


def test_truncated_jpeg_is_a_bad_request(jpegs: list[bytes]) -> None:
    cut = base64.b64encode(jpegs[0][: len(jpegs[0]) // 2]).decode()
    with pytest.raises(BadRequest, match="cannot be decoded"):
        decode_image(cut, LIMITS)


def test_gif_is_refused_even_if_valid() -> None:
    with pytest.raises(BadRequest, match="is not one of"):
        decode_image(encode(Image.new("RGB", (224, 224)), "GIF"), LIMITS)


@pytest.mark.parametrize(("side", "message"), [(5000, "5000x5000 pixels"), (20000, "decompression bomb")])
def test_decompression_bomb_is_refused_before_decoding(side: int, message: str) -> None:
    # One colour: a few hundred KB of PNG, up to 1.2 GB once decoded. Past PIL's
    # own bound (20000) PIL refuses at open; below it our pixel limit does.
    bomb = encode(Image.new("1", (side, side)), "PNG", optimize=True)
    assert len(bomb) < 400_000
    with pytest.raises(PayloadTooLarge, match=message):
        decode_image(bomb, LIMITS)


def test_the_pixel_count_is_checked_from_the_header_before_any_pixel_is_decoded() -> None:
    """A 30 MP JPEG cut right after its header: decoding it would fail (400); the header alone refuses it."""
    full = street_jpegs(1, size=(6400, 4800))[0]
    header = full[: full.index(b"\xff\xda") + 20]  # up to the start of the scan data
    limits = DecodeLimits(len(full), 25_000_000, LIMITS.formats)
    with pytest.raises(PayloadTooLarge, match="6400x4800 pixels, more than 25000000"):
        decode_image(base64.b64encode(header).decode(), limits)
    with pytest.raises(BadRequest, match="cannot be decoded"):  # what a decode of it gives
        decode_image(base64.b64encode(header).decode(), DecodeLimits(len(full), 40_000_000, LIMITS.formats))


def test_oversized_payload_is_refused_before_base64_decoding() -> None:
    limits = DecodeLimits(10_000, LIMITS.max_pixels, LIMITS.formats)
    with pytest.raises(PayloadTooLarge, match="larger than 10000 bytes"):
        decode_image("A" * 20_000, limits)
