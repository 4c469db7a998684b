"""Training sources: the validator's parquet rules, image folders, the local hub cache only, dedup
by image hash, hash-stable holdout and validation, and the weighted mix of an epoch."""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from svd.train.sources import (
    IMAGE_FOLDER,
    NATIX_PARQUET,
    REAL,
    SYNTHETIC,
    FileRef,
    Record,
    SourceError,
    SourceSpec,
    read_images,
    read_records,
    resolve_hub_dataset,
    scan_source,
)
from svd.train.splits import HOLDOUT, TRAIN, VALIDATION, MixConfig, assemble, draw_epoch, shares, split_of
from tests.helpers import fake_hub_cache

REPO = "natix-network-org/roadwork"


def jpeg(seed: int, fmt: str = "JPEG") -> bytes:
    """A small image that differs for every seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_parquet(path: Path, columns: dict[str, list[Any]], row_group_size: int = 4) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def natix_columns(seeds: list[int], labels: list[int]) -> dict[str, list[Any]]:
    """Columns as the hub set has them: image struct, label, a description that agrees."""
    return {
        "image": [{"bytes": jpeg(s), "path": f"{s}.jpg"} for s in seeds],
        "label": labels,
        "scene_description": ["Road with cones." if label else "" for label in labels],
    }


def image_folder(root: Path, images: dict[str, list[bytes]]) -> Path:
    for folder, blobs in images.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for k, blob in enumerate(blobs):
            (root / folder / f"img{k}.jpg").write_bytes(blob)
    return root


def test_parquet_rows_read_as_the_validator_reads_them(tmp_path: Path) -> None:
    good = [jpeg(k) for k in range(6)]
    # Raw binary; base64 text where PIL cannot open the bytes (the validator's fallback); garbage; nulls.
    raw: list[Any] = [
        good[0],
        good[1],
        base64.b64encode(good[2]),
        b"not an image",
        good[3],
        good[4],
        None,
        good[5],
        None,
    ]
    columns = {
        "label": [1, 0, 1, 0, 2, None, 1, 0, 1],
        "raw_image": raw,
        "image_2": [b""] * 9,  # only the first column naming "image" counts
        "scene_description": ["Cones.", None, "Barrier.", "", "Cones.", "", "Sign.", "Lane closed.", ""],
    }
    write_parquet(tmp_path / "a.parquet", columns)
    scan = scan_source(SourceSpec("natix", NATIX_PARQUET, path=tmp_path))
    assert scan.rows == 9
    assert dict(scan.skipped) == {
        "no_image": 2,  # garbage bytes; a null image
        "bad_label": 2,
        "description_with_label_0": 1,
        "no_description_with_label_1": 1,
    }
    assert [(r.sha256, r.label) for r in scan.records] == [(sha(good[0]), 1), (sha(good[1]), 0), (sha(good[2]), 1)]
    assert read_images([r.ref for r in scan.records]) == good[:3]
    assert {r.origin for r in scan.records} == {REAL} and {r.source for r in scan.records} == {"natix"}


def test_parquet_struct_keys_and_missing_description_column(tmp_path: Path) -> None:
    blobs = [jpeg(10), jpeg(11)]
    write_parquet(tmp_path / "x" / "b.parquet", {"Image": [{"image_bytes": b} for b in blobs], "label": [1, 0]})
    write_parquet(tmp_path / "y" / "c.parquet", {"image_b64": [base64.b64encode(jpeg(12)).decode()], "label": [0]})
    scan = scan_source(SourceSpec("mine", NATIX_PARQUET, path=tmp_path))
    # No scene_description column: nothing to disagree with, every row is kept.
    assert [r.sha256 for r in scan.records] == [sha(b) for b in [*blobs, jpeg(12)]] and not scan.skipped
    assert scan.records[2].read() == jpeg(12)


def test_parquet_without_image_or_label_column_is_refused(tmp_path: Path) -> None:
    write_parquet(tmp_path / "c.parquet", {"picture": [jpeg(1)], "label": [1]})
    with pytest.raises(SourceError, match="no image column"):
        scan_source(SourceSpec("natix", NATIX_PARQUET, path=tmp_path))
    with pytest.raises(SourceError, match="not a directory"):
        scan_source(SourceSpec("natix", NATIX_PARQUET, path=tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"no \*\.parquet"):
        scan_source(SourceSpec("natix", NATIX_PARQUET, path=tmp_path / "empty"))


def test_row_groups_read_once_for_many_rows(tmp_path: Path) -> None:
    seeds = list(range(20))
    write_parquet(tmp_path / "d.parquet", natix_columns(seeds, [s % 2 for s in seeds]), row_group_size=3)
    records = scan_source(SourceSpec("natix", NATIX_PARQUET, path=tmp_path)).records
    assert len({r.ref.row_group for r in records}) == 7  # type: ignore[attr-defined]
    picked = [records[k] for k in (19, 0, 7, 8, 3)]
    assert [sha(b) for b in read_images([r.ref for r in picked])] == [r.sha256 for r in picked]
    assert picked[0].read() == jpeg(19)
    assert read_records(picked) == [jpeg(s) for s in (19, 0, 7, 8, 3)]
    forged = Record("0" * 64, 1, "natix", REAL, picked[0].ref)
    with pytest.raises(SourceError, match="changed since it was scanned"):
        forged.read()


def test_image_folders(tmp_path: Path) -> None:
    root = image_folder(
        tmp_path / "set",
        {"none": [jpeg(1)], "Roadwork": [jpeg(2)], "0/nested": [jpeg(3)], "1": [jpeg(4)], "misc": [jpeg(5)]},
    )
    (root / "1" / "notes.txt").write_text("not an image")
    (root / "1" / "broken.png").write_bytes(b"\x89PNG broken")
    (root / "none" / "shot.png").write_bytes(jpeg(6, "PNG"))
    scan = scan_source(SourceSpec("folders", IMAGE_FOLDER, path=root, synthetic=True))
    got = {r.sha256: r.label for r in scan.records}
    assert got == {sha(jpeg(1)): 0, sha(jpeg(3)): 0, sha(jpeg(6, "PNG")): 0, sha(jpeg(2)): 1, sha(jpeg(4)): 1}
    assert dict(scan.skipped) == {"no_image": 1, "unknown_class_folder": 1}
    assert {r.origin for r in scan.records} == {SYNTHETIC}
    assert all(isinstance(r.ref, FileRef) and r.read() for r in scan.records)
    with pytest.raises(SourceError, match="no class folder"):
        scan_source(SourceSpec("empty", IMAGE_FOLDER, path=root / "misc"))


def test_duplicates_dropped_first_source_wins(tmp_path: Path) -> None:
    write_parquet(tmp_path / "p" / "e.parquet", natix_columns([1, 2, 3, 2], [1, 0, 1, 0]))
    image_folder(tmp_path / "f", {"1": [jpeg(1), jpeg(7)], "0": [jpeg(8), jpeg(3)]})
    specs = [
        SourceSpec("natix", NATIX_PARQUET, path=tmp_path / "p"),
        SourceSpec("extra", IMAGE_FOLDER, path=tmp_path / "f"),
    ]
    data = assemble(specs, MixConfig(holdout_permille=0, validation_permille=0))
    natix, extra = data.sources
    assert (natix.duplicates, extra.duplicates) == (1, 2)
    assert (natix.conflicts, extra.conflicts) == (0, 1)  # image 3: roadwork in natix, none in the folder
    assert Counter(r.source for r in data.pools["natix"] + data.pools["extra"]) == {"natix": 3, "extra": 2}
    hashes = [r.sha256 for pool in data.pools.values() for r in pool]
    assert len(hashes) == len(set(hashes)) == 5
    assert next(r for r in data.pools["natix"] if r.sha256 == sha(jpeg(1))).source == "natix"


def test_splits_follow_the_image_not_the_set(tmp_path: Path) -> None:
    image_folder(tmp_path / "a", {"0": [jpeg(k) for k in range(0, 150)], "1": [jpeg(k) for k in range(150, 300)]})
    image_folder(tmp_path / "b", {"0": [jpeg(k) for k in range(100, 250)], "1": [jpeg(k) for k in range(400, 500)]})
    mix = MixConfig(holdout_permille=150, validation_permille=150)

    def splits(root: Path) -> dict[str, str]:
        data = assemble([SourceSpec("s", IMAGE_FOLDER, path=root)], mix)
        named = {HOLDOUT: data.holdout, VALIDATION: data.validation, TRAIN: data.pools["s"]}
        assert not {r.sha256 for r in data.train} & {r.sha256 for r in data.holdout + data.validation}
        return {r.sha256: name for name, records in named.items() for r in records}

    first, second = splits(tmp_path / "a"), splits(tmp_path / "b")
    shared = first.keys() & second.keys()
    assert len(shared) == 150 and all(first[h] == second[h] for h in shared)
    assert all(first[h] == split_of(h, 150, 150) for h in first)
    hashes = [sha(str(k).encode()) for k in range(4000)]
    share = Counter(split_of(h, 150, 150) for h in hashes)
    assert abs(share[HOLDOUT] / 4000 - 0.15) < 0.02
    assert abs(share[VALIDATION] / 4000 - 0.85 * 0.15) < 0.02


def test_weights_set_each_sources_share_of_an_epoch(tmp_path: Path) -> None:
    image_folder(tmp_path / "small", {"1": [jpeg(k) for k in range(10)]})
    image_folder(tmp_path / "big", {"0": [jpeg(k) for k in range(100, 140)]})
    image_folder(tmp_path / "eval", {"0": [jpeg(k) for k in range(200, 220)]})
    specs = [
        SourceSpec("small", IMAGE_FOLDER, path=tmp_path / "small", weight=3.0),
        SourceSpec("big", IMAGE_FOLDER, path=tmp_path / "big", weight=1.0),
        SourceSpec("eval", IMAGE_FOLDER, path=tmp_path / "eval", weight=0.0),
    ]
    data = assemble(specs, MixConfig(holdout_permille=0, validation_permille=0, epoch_size=80, seed=1))
    counts = Counter(r.source for r in data.train)
    assert counts == {"small": 60, "big": 20}
    assert set(Counter(r.sha256 for r in data.train if r.source == "small").values()) == {6}
    assert len({r.sha256 for r in data.train if r.source == "big"}) == 20
    assert data.sources[0].drawn == {0: 0, 1: 60} and data.sources[2].drawn == {0: 0, 1: 0}
    assert data.epoch(2) != data.train and Counter(r.source for r in data.epoch(2)) == counts
    default = assemble(specs, MixConfig(holdout_permille=0, validation_permille=0))
    # 37.5 and 12.5: a tie on the remainder goes to the name first in order.
    assert default.epoch_size == 50 and Counter(r.source for r in default.train) == {"small": 37, "big": 13}
    held = assemble(specs, MixConfig(holdout_permille=1000))
    assert not held.train and held.sources[2].labels[HOLDOUT] == {0: 20, 1: 0}
    json.dumps(data.report())  # the run report is plain JSON


def test_shares_and_epoch_draws() -> None:
    assert shares({"a": 1.0, "b": 1.0, "c": 1.0}, 10) == {"a": 4, "b": 3, "c": 3}
    assert shares({"a": 0.0}, 5) == {"a": 0}
    pool = [Record(f"{k:064x}", 1, "a", REAL, FileRef(Path(f"{k}.jpg"))) for k in range(7)]
    epoch = draw_epoch({"a": pool}, {"a": 1.0}, 16, seed=0)
    assert sorted(Counter(r.sha256 for r in epoch).values()) == [2, 2, 2, 2, 2, 3, 3]
    assert draw_epoch({"a": pool}, {"a": 1.0}, 16, seed=0) == epoch


def test_records_may_carry_features() -> None:
    ref = FileRef(Path("x.jpg"))
    plain = Record("ab" * 32, 1, "samples", REAL, ref)
    with_features = Record("ab" * 32, 1, "samples", REAL, ref, features=np.ones(8, dtype=np.float32))
    assert plain == with_features and with_features.features is not None


def test_spec_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not both"):
        SourceSpec("x", NATIX_PARQUET, path=tmp_path, repo_id=REPO)
    with pytest.raises(ValueError, match="not both or neither"):
        SourceSpec("x", NATIX_PARQUET)
    with pytest.raises(ValueError, match="natix_parquet sources only"):
        SourceSpec("x", IMAGE_FOLDER, repo_id=REPO)
    with pytest.raises(ValueError, match="weight"):
        SourceSpec("x", IMAGE_FOLDER, path=tmp_path, weight=float("nan"))
    with pytest.raises(ValueError, match="unknown kind"):
        scan_source(SourceSpec("x", "samples_db", path=tmp_path))
    with pytest.raises(SourceError, match="unique"):
        assemble([SourceSpec("x", IMAGE_FOLDER, path=tmp_path)] * 2)


def test_hub_dataset_from_the_local_cache_only(tmp_path: Path) -> None:
    shard = write_parquet(tmp_path / "src" / "s.parquet", natix_columns([1, 2, 3], [1, 0, 1]))
    snapshot = fake_hub_cache(tmp_path / "hub", REPO, {"data/train-00000-of-00001.parquet": shard.read_bytes()})
    assert resolve_hub_dataset(REPO, cache_dir=tmp_path / "hub") == snapshot
    data = assemble(
        [SourceSpec("natix", NATIX_PARQUET, repo_id=REPO)], MixConfig(holdout_permille=0), hub_cache=tmp_path / "hub"
    )
    assert data.sources[0].location == f"hf:{REPO}"
    assert sorted(r.sha256 for r in data.pools["natix"] + data.validation) == sorted(sha(jpeg(k)) for k in (1, 2, 3))


def test_missing_hub_dataset_says_how_to_fetch_it(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    with pytest.raises(SourceError) as caught:
        assemble([SourceSpec("natix", NATIX_PARQUET, repo_id=REPO)], hub_cache=tmp_path / "hub")
    message = str(caught.value)
    assert REPO in message and "hf auth login" in message
    assert f"hf download {REPO} --repo-type dataset" in message
    fake_hub_cache(tmp_path / "hub", REPO, {"README.md": b"x"})
    with pytest.raises(SourceError, match="at revision v9"):
        resolve_hub_dataset(REPO, revision="v9", cache_dir=tmp_path / "hub")
