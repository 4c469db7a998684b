"""svd.train.augment against a plain NumPy/PIL rendering of the validator's rules (protocol.md)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from svd.train import augment as aug

# The same strength tables as protocol.md, written out again so a typo in the module shows.
REF_SATURATION = (0.4, 0.3)
REF_CONTRAST = (0.85, 0.725)
REF_DOWNSCALE = (112, 74)
REF_NOISE_VARIANCE = (0.001, 0.002)
REF_BLUR = ((7, 7 / 6), (9, 1.5))
# Their noise: unit variance on a [0, 1] studio scale is 255*255/219 on Y, 255*255/224 on chroma.
REF_NOISE_GAIN = (255 * 255 / 219, 255 * 255 / 224)
STATS = ("brightness", "red", "green", "blue", "saturation", "log_laplacian_var", "log_hf_energy", "top_minus_bottom")
ALPHA = 1e-3
BOUNDED = ("brightness", "red", "green", "blue", "saturation")
N_VIEWS = 256


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Two intra-op threads on two busy cores turn a 2 ms resize into 20 ms.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- source images


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    coarse = rng.random((h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    big = Image.fromarray((coarse * 255).astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float64)


def _street(rng: np.random.Generator) -> np.ndarray:
    # Bright sky on top, dark road below, orange cones and white stripes: strongly top-heavy.
    h, w = 480, 640
    y = np.linspace(0, 1, h)[:, None, None]
    sky = np.array([150.0, 190.0, 240.0]) * (1 - y) + np.array([70.0, 70.0, 75.0]) * y
    img = sky + 0.25 * (_smooth_noise(rng, h, w, 8) - 128)
    for x0 in (100, 300, 500):
        img[300:420, x0 : x0 + 40] = (240, 120, 20)
    img[440:450, ::32] = 250
    return np.clip(img, 0, 255).astype(np.uint8)


def _texture(rng: np.random.Generator) -> np.ndarray:
    img = _smooth_noise(rng, 512, 512, 16)
    checker = ((np.indices((512, 512)).sum(axis=0) // 3) % 2 * 200 + 25)[..., None]
    img[128:384, 128:384] = checker[128:384, 128:384]
    return img.clip(0, 255).astype(np.uint8)


def _portrait(rng: np.random.Generator) -> np.ndarray:
    img = _smooth_noise(rng, 640, 420, 40) * 0.8 + rng.normal(0, 10, (640, 420, 3))
    img[::20, :] = 0
    return img.clip(0, 255).astype(np.uint8)


def _flat(rng: np.random.Generator) -> np.ndarray:
    img = np.empty((600, 600, 3), np.uint8)
    img[:] = (30, 160, 60)
    img[:300, :300] = (220, 40, 40)
    img[350:, 200:450] = (255, 255, 255)
    return img


@pytest.fixture(scope="module")
def sources() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [_street(rng), _texture(rng), _portrait(rng), _flat(rng)]


# ----------------------------------------------------------------------------- reference rendering


def ref_rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    """Counter-clockwise about the pixel-centre midpoint, nearest neighbour, black outside."""
    h, w = img.shape[:2]
    oy = (np.arange(h) - (h - 1) / 2)[:, None]
    ox = (np.arange(w) - (w - 1) / 2)[None, :]
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    sx = np.rint((w - 1) / 2 + ox * c - oy * s).astype(np.int64)
    sy = np.rint((h - 1) / 2 + ox * s + oy * c).astype(np.int64)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    flat = np.clip(sy, 0, h - 1) * w + np.clip(sx, 0, w - 1)
    return img.reshape(-1, 3)[flat] * inside[..., None].astype(np.uint8)


def ref_crop_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """torchvision's RandomResizedCrop.get_params for scale (0.2, 1), ratio 1: (top, left, side)."""
    for _ in range(10):
        side = round(math.sqrt(h * w * rng.uniform(0.2, 1.0)))
        if 0 < side <= min(h, w):
            return int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1)), side
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side


def ref_resize_aa(img: np.ndarray) -> np.ndarray:
    """Float bilinear with antialiasing (PIL's float path), then floor(x * 255)."""
    unit = img.astype(np.float32) / np.float32(255)
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(unit[..., c])).resize((224, 224), Image.Resampling.BILINEAR))
        for c in range(3)
    ]
    return (np.stack(channels, axis=-1) * np.float32(255)).clip(0, 255).astype(np.uint8)


def ref_level0(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    side = min(h, w)
    top, left = round((h - side) / 2), round((w - side) / 2)
    square = Image.fromarray(img).crop((left, top, left + side, top + side))
    return np.asarray(square.resize((224, 224), Image.Resampling.BILINEAR))


def ref_saturation(img: np.ndarray, factor: float) -> np.ndarray:
    x = img.astype(np.float64)
    luma = (x @ np.array([0.299, 0.587, 0.114]))[..., None]
    return (luma + factor * (x - luma)).clip(0, 255).astype(np.uint8)


def ref_contrast(img: np.ndarray, factor: float) -> np.ndarray:
    return (img.astype(np.float32) * np.float32(factor)).astype(np.uint8)


def _linear_axis(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    # Half-pixel centres, two taps, clamped at the edges: bilinear without antialiasing.
    n_in = x.shape[axis]
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    t = np.expand_dims(src - lo, axis=1 - axis)[..., None]
    return np.take(x, lo, axis=axis) * (1 - t) + np.take(x, np.minimum(lo + 1, n_in - 1), axis=axis) * t


def ref_linear_resize(img: np.ndarray, side: int) -> np.ndarray:
    out = _linear_axis(_linear_axis(img.astype(np.float64), side, 0), side, 1)
    return np.rint(out).clip(0, 255).astype(np.uint8)


def ref_downscale(img: np.ndarray, side: int) -> np.ndarray:
    return ref_linear_resize(ref_linear_resize(img, side), 224)


def ref_noise(img: np.ndarray, variance: float, rng: np.random.Generator) -> np.ndarray:
    std = math.sqrt(variance)
    n_y = rng.standard_normal(img.shape[:2]) * std * REF_NOISE_GAIN[0]
    n_cb, n_cr = (rng.standard_normal(img.shape[:2]) * std * REF_NOISE_GAIN[1] for _ in range(2))
    # Full-range BT.601 YCbCr -> RGB applied to the noise alone.
    delta = np.stack([n_y + 1.402 * n_cr, n_y - 0.344136 * n_cb - 0.714136 * n_cr, n_y + 1.772 * n_cb], axis=-1)
    return (img + delta).clip(0, 255).astype(np.uint8)


def ref_blur(img: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    x = np.arange(ksize) - ksize // 2
    k = np.exp(-(x**2) / (2 * sigma**2))
    k /= k.sum()
    r = ksize // 2
    padded = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")  # reflect-101
    rows = sum(k[i] * padded[i : i + img.shape[0]] for i in range(ksize))
    out = sum(k[i] * rows[:, i : i + img.shape[1]] for i in range(ksize))
    return np.rint(out).clip(0, 255).astype(np.uint8)


def _ref_distortions(level: int, rng: np.random.Generator) -> list[tuple[str, int]]:
    names = ["saturation", "contrast", "downscale"] + (["noise", "blur"] if level == 3 else [])
    return [(name, int(rng.integers(0, 2 if level == 2 else 3))) for name in names]


def _ref_distort(img: np.ndarray, name: str, strength: int, rng: np.random.Generator) -> np.ndarray:
    i = strength - 1
    if name == "saturation":
        return ref_saturation(img, REF_SATURATION[i])
    if name == "contrast":
        return ref_contrast(img, REF_CONTRAST[i])
    if name == "downscale":
        return ref_downscale(img, REF_DOWNSCALE[i])
    if name == "noise":
        return ref_noise(img, REF_NOISE_VARIANCE[i], rng)
    return ref_blur(img, *REF_BLUR[i])


def ref_view(
    img: np.ndarray, rng: np.random.Generator, level: int, flips: bool = False, skip: frozenset[str] = frozenset()
) -> np.ndarray:
    """The validator's rules, one after the other, ending in PIL's default JPEG."""
    if level == 0:
        out = ref_level0(img)
    else:
        h, w = img.shape[:2]
        rotated = ref_rotate(img, rng.uniform(-20, 20))
        top, left, side = ref_crop_box(h, w, rng)
        out = ref_resize_aa(rotated[top : top + side, left : left + side])
        if flips:  # what torchvision's flips would have done, had they ever fired
            out = out[:, ::-1] if rng.random() < 0.5 else out
            out = out[::-1] if rng.random() < 0.5 else out
    for name, strength in _ref_distortions(level, rng) if level >= 2 else []:
        if strength > 0 and name not in skip:
            out = _ref_distort(out, name, strength, rng)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(out)).save(buf, format="JPEG")
    return np.asarray(Image.open(buf).convert("RGB"))


# ----------------------------------------------------------------------------- unit tests


def _gradient(h: int = 480, w: int = 640) -> np.ndarray:
    # Red grows left to right, green top to bottom, never near black: orientation is measurable.
    img = np.empty((h, w, 3), np.uint8)
    img[..., 0] = np.linspace(60, 250, w)[None, :]
    img[..., 1] = np.linspace(60, 250, h)[:, None]
    img[..., 2] = 128
    return img


@pytest.mark.parametrize("level", aug.LEVELS)
@pytest.mark.parametrize("shape", [(480, 640, 3), (641, 420, 3), (150, 200, 3), (300, 300)])
def test_every_level_gives_224_rgb_bytes(level: int, shape: tuple[int, ...]) -> None:
    img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    view = aug.render_view(img, seed=3, level=level)
    assert view.image.shape == (224, 224, 3)
    assert view.image.dtype == np.uint8
    assert view.level == level
    assert np.array_equal(aug.decode_jpeg(view.jpeg), view.image)


def test_pil_images_of_any_mode_are_accepted() -> None:
    for mode in ("RGBA", "P", "L", "CMYK"):
        im = Image.new(mode, (320, 240))
        assert aug.augment_view(im, 1).shape == (224, 224, 3)
        assert aug.augment_view(im, 1, resave_jpeg=True).shape == (224, 224, 3)


def test_the_view_is_a_pil_default_jpeg() -> None:
    view = aug.render_view(_gradient(), seed=11)
    reference = io.BytesIO()
    Image.new("RGB", (224, 224)).save(reference, format="JPEG", quality=75, subsampling="4:2:0")
    with Image.open(io.BytesIO(view.jpeg)) as im, Image.open(reference) as ref:
        assert isinstance(im, JpegImagePlugin.JpegImageFile)
        assert isinstance(ref, JpegImagePlugin.JpegImageFile)
        assert im.size == (224, 224)
        assert JpegImagePlugin.get_sampling(im) == 2  # 4:2:0
        assert im.quantization == ref.quantization  # quality 75


def test_a_seed_fixes_the_view_and_seeds_differ() -> None:
    img = _gradient()
    views = [aug.render_view(img, seed) for seed in range(16)]
    assert [aug.render_view(img, seed).jpeg for seed in range(16)] == [v.jpeg for v in views]
    for seed, v in enumerate(views):
        assert v.level == aug.view_level(seed)
        assert aug.render_view(img, seed, level=v.level).jpeg == v.jpeg
    # Level 0 has nothing random: every level-0 seed gives the same view; the others all differ.
    random_views = [v.jpeg for v in views if v.level > 0]
    assert len(set(random_views)) == len(random_views) >= 8
    assert len({v.jpeg for v in views if v.level == 0}) == 1


def test_levels_are_drawn_with_equal_odds() -> None:
    counts = np.bincount([aug.view_level(seed) for seed in range(4000)], minlength=4) / 4000
    assert np.all(np.abs(counts - 0.25) < 0.025), counts
    skewed = np.bincount([aug.view_level(s, (0.7, 0.1, 0.1, 0.1)) for s in range(2000)], minlength=4) / 2000
    assert abs(skewed[0] - 0.7) < 0.04


def _orientation(rgb: np.ndarray) -> tuple[float, float]:
    lit = rgb.astype(np.float64).sum(axis=2) > 120  # rotation corners are black: leave them out
    ys, xs = np.nonzero(lit)
    return (
        float(np.corrcoef(xs, rgb[ys, xs, 0])[0, 1]),
        float(np.corrcoef(ys, rgb[ys, xs, 1])[0, 1]),
    )


def test_views_are_never_flipped() -> None:
    img = _gradient()
    for seed in range(48):
        out = aug.augment_view(img, seed, level=1 + seed % 3)
        horizontal, vertical = _orientation(out)
        # Over ~50k pixels, even level-3 noise leaves the sign unmistakable.
        assert horizontal > 0.1 and vertical > 0.1, (seed, horizontal, vertical)
        # The check can fail: a flipped view reverses the sign.
        assert _orientation(out[:, ::-1])[0] < -0.1
        assert _orientation(out[::-1])[1] < -0.1


def test_rotation_is_nearest_with_black_corners() -> None:
    palette = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200], [250, 250, 250]], np.uint8)
    img = palette[np.random.default_rng(1).integers(0, 4, (48, 64))].repeat(10, 0).repeat(10, 1)
    rotate = aug.build_pipeline(1, *img.shape[:2]).transforms[0]
    assert isinstance(rotate, A.Rotate)
    allowed = set(_packed(palette).tolist()) | {0}
    angles = []
    for seed in range(20):
        rotate.set_random_seed(seed)
        out = rotate(image=img)["image"]
        angle = math.degrees(math.acos(np.clip(rotate.params["matrix"][0, 0], -1, 1)))
        angles.append(angle)
        assert set(np.unique(_packed(out)).tolist()) <= allowed  # no blend: nearest
        if angle > 1:
            assert not out[[0, 0, -1, -1], [0, -1, 0, -1]].any()
        assert out.shape == img.shape  # no expansion
    assert 10 < max(angles) <= 20


def _packed(rgb: np.ndarray) -> np.ndarray:
    x = rgb.reshape(-1, 3).astype(np.int64)
    return x[:, 0] << 16 | x[:, 1] << 8 | x[:, 2]


def test_rotation_direction_and_centre_match_torchvision() -> None:
    img = np.random.default_rng(2).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    for degrees in (-17.5, 3.0, 12.25):
        ours = A.Rotate(limit=(degrees, degrees), interpolation=0, border_mode=0, fill=0, p=1)(image=img)["image"]
        assert (ours != ref_rotate(img, degrees)).any(axis=2).mean() < 0.005


def test_crop_resize_is_antialiased_bilinear() -> None:
    img = np.random.default_rng(3).integers(0, 256, (500, 500, 3), dtype=np.uint8)
    ours = aug.resize_antialiased(img, (224, 224))
    diff = ours.astype(int) - ref_resize_aa(img)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01
    aliased = aug.resize_antialiased(img[::2, ::2], (224, 224))  # a sharper image is told apart
    assert np.abs(aliased.astype(int) - ref_resize_aa(img)).mean() > 5


def test_distortion_kernels_follow_the_rules() -> None:
    rng = np.random.default_rng(4)
    img = np.asarray(Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).resize((224, 224)))
    for f in aug.SATURATION:
        out = aug.ValidatorSaturation(f)(image=img)["image"]
        assert np.abs(out.astype(int) - ref_saturation(img, f)).max() <= 1
    grey = np.full((4, 4, 3), 90, np.uint8)
    assert aug.ValidatorSaturation(0.4)(image=grey)["image"][0, 0].tolist() == [89, 90, 89]  # their pivot
    for f, contrast in zip(aug.CONTRAST, (aug._contrast(f) for f in aug.CONTRAST), strict=True):
        assert np.array_equal(contrast(image=img)["image"], ref_contrast(img, f))
    for side in aug.DOWNSCALE:
        out = aug._downscale(side)(image=img)["image"]
        assert np.abs(out.astype(int) - ref_downscale(img, side)).max() <= 2
    for k, sigma in REF_BLUR:
        out = A.GaussianBlur(blur_limit=(k, k), sigma_limit=(sigma, sigma), p=1)(image=img)["image"]
        assert np.abs(out.astype(int) - ref_blur(img, k, sigma)).max() <= 1


@pytest.mark.parametrize(("variance", "stds"), [(0.001, (15.9, 11.9, 18.8)), (0.002, (22.5, 16.8, 26.6))])
def test_colour_noise_has_the_validators_spread(variance: float, stds: tuple[float, float, float]) -> None:
    grey = np.full((224, 224, 3), 128, np.uint8)
    noise = aug.ValidatorColorNoise(variance)
    noise.set_random_seed(0)
    out = noise(image=grey)["image"].reshape(-1, 3).astype(np.float64)
    assert np.allclose(out.std(axis=0), stds, rtol=0.04)
    assert np.corrcoef(out.T)[0, 2] > 0.2  # Y noise is shared by the channels
    ref = ref_noise(grey, variance, np.random.default_rng(0)).reshape(-1, 3).astype(np.float64)
    assert np.allclose(ref.std(axis=0), stds, rtol=0.04)


def test_resave_jpeg_compresses_the_source_first() -> None:
    img = np.random.default_rng(5).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    once = aug.decode_jpeg(aug.encode_jpeg(img))
    assert np.array_equal(aug.augment_view(img, 8, resave_jpeg=True), aug.augment_view(once, 8))
    assert not np.array_equal(aug.augment_view(img, 8, resave_jpeg=True), aug.augment_view(img, 8))
    pil = Image.fromarray(img)
    assert np.array_equal(aug.augment_view(pil, 8, resave_jpeg=True), aug.augment_view(once, 8))


def test_view_seeds_are_fixed_per_image_and_salt() -> None:
    seeds = aug.view_seeds("ab" * 32, 8)
    assert seeds == aug.view_seeds("ab" * 32, 8)
    assert len(set(seeds)) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert aug.view_seeds("ab" * 32, 3) == seeds[:3]
    assert set(seeds).isdisjoint(aug.view_seeds("cd" * 32, 8))
    assert set(seeds).isdisjoint(aug.view_seeds("ab" * 32, 8, salt="calibration"))
    assert aug.view_seeds("ab" * 32, 0) == []
    assert aug.render_view(_gradient(), seeds[0]).jpeg == aug.render_view(_gradient(), seeds[0]).jpeg


@pytest.mark.parametrize(
    ("image", "seed", "level"),
    [
        (np.zeros((32, 32, 3), np.float32), 0, None),
        (np.zeros((32, 32, 4), np.uint8), 0, None),
        (np.zeros((32, 32, 3), np.uint8), -1, None),
        (np.zeros((32, 32, 3), np.uint8), 0, 4),
    ],
)
def test_bad_arguments_are_refused(image: np.ndarray, seed: int, level: int | None) -> None:
    with pytest.raises(ValueError):
        aug.render_view(image, seed, level)


# ----------------------------------------------------------------------------- statistics


_FREQ = np.hypot(np.fft.fftfreq(224)[:, None], np.fft.rfftfreq(224)[None, :])


def view_stats(rgb: np.ndarray) -> np.ndarray:
    """Brightness, channel means, HSV saturation, log sharpness, log high-frequency share, top minus bottom."""
    r, g, b = (rgb[..., c].astype(np.float32) for c in range(3))
    grey = 0.299 * r + 0.587 * g + 0.114 * b
    hi, lo = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    saturation = float(((hi - lo) / np.maximum(hi, 1)).mean())
    lap = 4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    power = np.abs(np.fft.rfft2(grey - grey.mean())) ** 2
    hf = power[_FREQ > 0.25].sum() / max(float(power.sum()), 1e-9)
    vertical = grey[:75].mean() - grey[-75:].mean()
    stats = [
        grey.mean(),
        r.mean(),
        g.mean(),
        b.mean(),
        saturation,
        math.log(lap.var() + 1),
        math.log(hf + 1e-6),
        vertical,
    ]
    return np.array(stats, dtype=np.float64)


def ks_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov, asymptotic p-value (Stephens' correction)."""
    a, b = np.sort(a), np.sort(b)
    both = np.concatenate([a, b])
    d = np.abs(np.searchsorted(a, both, side="right") / len(a) - np.searchsorted(b, both, side="right") / len(b)).max()
    en = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return float(min(max(p, 0.0), 1.0))


def compare(ours: np.ndarray, ref: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Per statistic: (KS p-value, relative mean difference, mean difference in pooled SDs)."""
    out = {}
    for j, name in enumerate(STATS):
        a, b = ours[:, j], ref[:, j]
        pooled = math.sqrt((a.var() + b.var()) / 2) or 1.0
        rel = abs(a.mean() - b.mean()) / max(abs(b.mean()), 1e-9)
        out[name] = (ks_pvalue(a, b), rel, abs(a.mean() - b.mean()) / pooled)
    return out


def agrees(name: str, result: tuple[float, float, float]) -> bool:
    """Same distribution: KS does not reject, and means within 3 % (bounded stats) or 0.3 SD (the others)."""
    p, rel, sds = result
    close = rel < 0.03 if name in BOUNDED else sds < 0.3
    return p > ALPHA and close


# Every source at every level equally often, so level draws add no noise; source 0 is the street.
PLAN = [(i % 4, (i // 4) % 4) for i in range(N_VIEWS)]
STREET = np.array([s == 0 for s, _ in PLAN])
LEVEL_2_3 = np.array([level >= 2 for _, level in PLAN])


def _ours_stats(sources: list[np.ndarray]) -> np.ndarray:
    return np.array([view_stats(aug.augment_view(sources[s], 1000 + i, level)) for i, (s, level) in enumerate(PLAN)])


def _ref_stats(sources: list[np.ndarray], seed: int, rows: np.ndarray | None = None, **variant: object) -> np.ndarray:
    rng = np.random.default_rng(seed)
    plan = [p for i, p in enumerate(PLAN) if rows is None or rows[i]]
    return np.array([view_stats(ref_view(sources[s], rng, level, **variant)) for s, level in plan])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ours_stats(sources: list[np.ndarray]) -> np.ndarray:
    return _ours_stats(sources)


@pytest.fixture(scope="module")
def ref_stats(sources: list[np.ndarray]) -> np.ndarray:
    return _ref_stats(sources, seed=99)


def test_statistics_match_the_reference_rendering(ours_stats: np.ndarray, ref_stats: np.ndarray) -> None:
    result = compare(ours_stats, ref_stats)
    # Orientation only means something on the top-heavy street scene.
    result["top_minus_bottom"] = compare(ours_stats[STREET], ref_stats[STREET])["top_minus_bottom"]
    failing = {name: r for name, r in result.items() if not agrees(name, r)}
    assert not failing, failing


@pytest.mark.parametrize(
    ("variant", "rows", "moved"),
    [
        ({"flips": True}, STREET, "top_minus_bottom"),
        ({"skip": frozenset({"blur", "downscale"})}, LEVEL_2_3, "log_laplacian_var"),
        ({"skip": frozenset({"saturation"})}, LEVEL_2_3, "saturation"),
        ({"skip": frozenset({"contrast"})}, LEVEL_2_3, "brightness"),
    ],
)
def test_a_wrong_rendering_is_caught(
    sources: list[np.ndarray],
    ours_stats: np.ndarray,
    ref_stats: np.ndarray,
    variant: dict[str, object],
    rows: np.ndarray,
    moved: str,
) -> None:
    assert agrees(moved, compare(ours_stats[rows], ref_stats[rows])[moved])
    wrong = compare(ours_stats[rows], _ref_stats(sources, 5, rows, **variant))[moved]
    assert not agrees(moved, wrong), wrong
