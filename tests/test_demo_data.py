"""The demo data: the NATIX parquet layout, read back by pyarrow, `datasets` and svd.train.sources;
determinism; and a class signal that a random tiny backbone keeps through the validator's distortions."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd.config import load_config
from svd.train.demo_data import (
    DEFAULT_SIZES,
    SYNTHETIC_SIZE,
    add_arguments,
    demo_rows,
    run_demo_data,
    write_demo_data,
)
from svd.train.metrics import mcc
from svd.train.sources import IMAGE_FOLDER, NATIX_PARQUET, SYNTHETIC, SourceSpec, read_images, scan_source
from tests.helpers import make_config

# Measured with the conftest tiny engine (hidden 64, 2 layers, seed 0), 320 images of 960x540,
# 2 validator views each, every 4th image held out: holdout MCC 0.73 for seed 0 (0.59-0.73 over
# seeds 0-3). The bound leaves room for changes in the augmentation or the engine.
LEARN_IMAGES = 320
LEARN_VIEWS = 2
LEARN_MIN_MCC = 0.4


def _rows(files: list[Path]) -> list[dict[str, object]]:
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()


def test_parquet_layout_matches_the_hub_set(tmp_path: Path) -> None:
    summary = write_demo_data(tmp_path, 40, seed=3, shard_rows=15, disagree_share=0.2, synthetic_share=0.0)
    names = [f.name for f in summary.files]
    assert names == [f"train-0000{k}-of-00003.parquet" for k in range(3)]
    schema = pq.read_schema(summary.files[0])
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert schema.field("label").type == pa.int64()
    assert schema.field("scene_description").type == pa.string()
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    rows = _rows(summary.files)
    assert [r["id"] for r in rows] == list(range(40))
    assert summary.rows == 40 and summary.labels[0] + summary.labels[1] == 40
    disagreeing = 0
    for row in rows:
        image = row["image"]
        assert isinstance(image, dict)
        with Image.open(io.BytesIO(image["bytes"])) as im:
            assert im.format == "JPEG" and im.size in DEFAULT_SIZES
            assert im.size == (row["width"], row["height"])
        assert row["label"] in (0, 1)
        disagreeing += bool(row["scene_description"]) != (row["label"] == 1)
    assert disagreeing == summary.disagreeing > 0


def test_datasets_reads_an_image_feature(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    summary = write_demo_data(tmp_path / "set", 12, seed=1, shard_rows=5, synthetic_share=0.0)
    ds = datasets.load_dataset(
        "parquet", data_files=[str(f) for f in summary.files], split="train", cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(ds.features["image"], datasets.Image)
    first = ds[0]
    assert isinstance(first["image"], Image.Image) and first["image"].size in DEFAULT_SIZES
    assert ds["label"] == [r["label"] for r in _rows(summary.files)]


def test_sources_skip_and_count_disagreeing_rows(tmp_path: Path) -> None:
    summary = write_demo_data(tmp_path, 60, seed=5, shard_rows=25, disagree_share=0.25, synthetic_share=0.0)
    rows = _rows(summary.files)
    label_0_described = sum(1 for r in rows if r["label"] == 0 and r["scene_description"])
    label_1_bare = sum(1 for r in rows if r["label"] == 1 and not r["scene_description"])
    assert any(r["scene_description"] is None for r in rows)  # nulls too, as in the real set

    scan = scan_source(SourceSpec("demo", NATIX_PARQUET, path=tmp_path))
    assert scan.rows == 60
    assert dict(scan.skipped) == {
        k: v
        for k, v in {"description_with_label_0": label_0_described, "no_description_with_label_1": label_1_bare}.items()
        if v
    }
    assert len(scan.records) == 60 - summary.disagreeing
    kept = [r for r in rows if bool(r["scene_description"]) == (r["label"] == 1)]
    blobs = read_images([rec.ref for rec in scan.records])
    for record, row, blob in zip(scan.records, kept, blobs, strict=True):
        image = row["image"]
        assert isinstance(image, dict)
        assert blob == image["bytes"]
        assert record.sha256 == hashlib.sha256(blob).hexdigest() and record.label == row["label"]


def test_same_seed_same_rows_whatever_the_sharding(tmp_path: Path) -> None:
    a = write_demo_data(tmp_path / "a", 24, seed=7, shard_rows=10, synthetic_share=0.0)
    b = write_demo_data(tmp_path / "b", 24, seed=7, shard_rows=24, workers=2, synthetic_share=0.0)
    assert _rows(a.files) == _rows(b.files)
    tail = list(demo_rows(4, seed=7, start=20))
    assert [r.image for r in tail] == [r["image"]["bytes"] for r in _rows(a.files)[20:]]  # type: ignore[index]
    other = list(demo_rows(4, seed=8, start=20))
    assert all(x.image != y.image for x, y in zip(tail, other, strict=True))


def test_synthetic_pngs_in_an_image_folder(tmp_path: Path) -> None:
    summary = write_demo_data(tmp_path, 10, seed=2, synthetic_share=0.4)
    assert summary.rows == 6 and sum(summary.synthetic.values()) == 4
    pngs = sorted((tmp_path / "synthetic").rglob("*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[0]) as im:
        assert im.format == "PNG" and im.size == (SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    scan = scan_source(SourceSpec("sdxl", IMAGE_FOLDER, path=tmp_path / "synthetic", synthetic=True))
    assert len(scan.records) == 4 and {r.origin for r in scan.records} == {SYNTHETIC}
    assert sorted(r.label for r in scan.records) == sorted(
        label for label, n in summary.synthetic.items() for _ in range(n)
    )


def test_cli_writes_the_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [str(tmp_path / "out"), "--count", "12", "--seed", "4", "--shard-rows", "3", "--workers", "1"]
    )
    assert args.func is run_demo_data
    assert run_demo_data(args, make_config(tmp_path)) == 0
    # A third synthetic by default, as validators draw them; the rest parquet rows.
    assert len(list((tmp_path / "out" / "data").glob("train-*-of-00003.parquet"))) == 3
    assert len(list((tmp_path / "out" / "synthetic").rglob("*.png"))) == 4
    out = capsys.readouterr().out
    assert "8 parquet rows" in out and "4 synthetic PNGs" in out
    # The sources it prints are a config that loads and names both.
    toml = out.split("add to config.toml:")[1]
    (tmp_path / "svd.toml").write_text(toml)
    sources = load_config(tmp_path / "svd.toml").train.sources
    assert [(s.kind, s.synthetic) for s in sources] == [("natix_parquet", False), ("image_folder", True)]
    bad = parser.parse_args([str(tmp_path / "out2"), "--synthetic-share", "1.5"])
    assert run_demo_data(bad, make_config(tmp_path)) == 2
    assert "synthetic-share" in capsys.readouterr().err


def _probe_mcc(features: np.ndarray, labels: np.ndarray, held: np.ndarray, l2: float = 1e-3) -> float:
    """Holdout MCC of an L2 logistic regression (Newton steps) on standardised features."""
    mean, std = features[~held].mean(0), features[~held].std(0) + 1e-6
    z = np.c_[(features - mean) / std, np.ones(len(features))]
    zt, yt = z[~held], labels[~held].astype(np.float64)
    reg = np.full(z.shape[1], l2)
    reg[-1] = 0.0
    w = np.zeros(z.shape[1])
    for _ in range(25):
        p = 1 / (1 + np.exp(-zt @ w))
        hessian = (zt * (p * (1 - p))[:, None]).T @ zt / len(yt) + np.diag(reg)
        w -= np.linalg.solve(hessian, zt.T @ (p - yt) / len(yt) + reg * w)
    return mcc((z[held] @ w > 0).astype(np.float64), labels[held], floored=False)


def test_random_tiny_backbone_learns_roadwork_through_distortions(tiny_engine: Path) -> None:
    """The point of the generator: a linear probe on random features separates the classes after
    the validator's crops and distortions. This proves the loop's mechanics can show learning, not
    accuracy (design.md, "Learning on a random backbone")."""
    from svd.engine.load import load_engine
    from svd.train.augment import augment_view, view_seeds

    views, labels, held = [], [], []
    for row in demo_rows(LEARN_IMAGES, seed=0, sizes=((960, 540),), disagree_share=0.0):
        with Image.open(io.BytesIO(row.image)) as src:
            src.load()
            for seed in view_seeds(hashlib.sha256(row.image).hexdigest(), LEARN_VIEWS, salt="test"):
                views.append(augment_view(src, seed, resave_jpeg=True))
                labels.append(row.label)
                held.append(row.id % 4 == 0)
    engine = load_engine(tiny_engine)
    try:
        batch = np.stack(views)
        features = np.concatenate([engine.infer(batch[k : k + 64]).features for k in range(0, len(batch), 64)])
    finally:
        engine.close()
    y, h = np.asarray(labels), np.asarray(held)
    assert 0.35 < y.mean() < 0.65
    assert _probe_mcc(features, y, h) >= LEARN_MIN_MCC
    shuffled = np.random.default_rng(0).permutation(y)
    assert abs(_probe_mcc(features, shuffled, h)) < 0.3  # the probe finds no signal where there is none
