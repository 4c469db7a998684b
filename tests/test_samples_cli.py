"""`svd samples`: counts by band, label state, source and day; export of a selection."""

import asyncio
import base64
import csv
import hashlib
import json
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from svd.cli import main
from svd.config import SamplesConfig
from svd.engine.manifest import EngineIdentity
from svd.samples.cli import parse_since
from svd.samples.log import SampleLog
from tests.test_uncertain import jpeg_b64

DAY = 86_400.0
T0 = 1_764_028_800.0  # 2025-11-25 00:00 UTC


def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "svd.toml"
    path.write_text("[samples]\nband_low = 0.4\nband_high = 0.6\n")  # the db: state/samples.db by default
    return path


def fill(db_path: Path) -> list[str]:
    """Eight samples over two days, written by the real writer; returns their image b64 in order."""
    # (day, prediction, testnet_label, image index): sources band, testnet, random (rate 1 catches the rest).
    plan = [(0, 0.5, None, 0), (0, 0.45, None, 1), (0, 0.9, 1, 2), (0, 0.05, None, 3)]
    plan += [(1, 0.55, None, 0), (1, 0.1, 0, 4), (1, 0.95, None, 5), (1, 0.42, None, 6)]
    times = iter([T0 + day * DAY + i for i, (day, *_) in enumerate(plan)])
    images = [jpeg_b64(i) for i in range(7)]
    cfg = SamplesConfig(band_low=0.4, band_high=0.6, random_rate=1.0)

    async def write() -> None:
        log = SampleLog(cfg, db_path, rng=random.Random(0), clock=times.__next__)
        await log.open()
        for _, pred, label, img in plan:
            assert log.offer(
                image=base64.b64decode(images[img]),
                image_format="jpeg",
                caller_hotkey="5Caller",
                prediction=pred,
                features=np.full(4, pred, dtype=np.float32),
                engine=EngineIdentity("tiny", "1", "ab" * 32),
                testnet_label=label,
            )
        await log.close()

    asyncio.run(write())
    conn = sqlite3.connect(db_path)
    # A reviewer labelled the day-1 band sample, as `svd review import` does.
    conn.execute(
        "UPDATE samples SET review_label = 1, reviewer = 'ann', reviewed_at = ? WHERE prediction = 0.55", (T0,)
    )
    conn.commit()
    conn.close()
    return images


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    path = config_file(tmp_path)
    fill(tmp_path / "state" / "samples.db")
    return path


def test_counts_by_band_label_source_and_day(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", str(cfg_path), "samples", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)
    assert c["samples"] == 8 and c["images"] == 7
    assert c["band"] == {"in-band": 4, "confident": 4}
    assert c["label"] == {"unlabelled": 5, "testnet": 2, "reviewed": 1}
    assert c["source"] == {"band": 4, "random": 2, "testnet": 2}
    assert c["day"] == {"2025-11-25": 4, "2025-11-26": 4}
    assert main(["--config", str(cfg_path), "samples"]) == 0
    table = capsys.readouterr().out
    assert "in-band 4  confident 4  (band 0.4..0.6)" in table and "2025-11-26  4" in table


def test_export_writes_images_by_hash_and_an_index(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["--config", str(cfg_path), "samples", "export", str(out)]) == 0
    assert "8 samples exported" in capsys.readouterr().out
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 8 and [r["prediction"] for r in index][:2] == [0.5, 0.45]  # oldest first
    with open(out / "index.csv", newline="") as f:
        assert [r["uid"] for r in csv.DictReader(f)] == [r["uid"] for r in index]
    files = sorted(p.name for p in out.glob("*.jpg"))
    assert len(files) == 7  # the image two callers sent is one file
    for r in index:
        data = (out / r["image"]).read_bytes()
        assert (
            r["image"] == hashlib.sha256(data).hexdigest() + ".jpg"
            and hashlib.sha256(data).hexdigest() == r["image_sha256"]
        )
    reviewed = [r for r in index if r["review_label"] is not None]
    assert [(r["review_label"], r["reviewer"], r["source"]) for r in reviewed] == [(1, "ann", "band")]
    assert index[0]["received_at"] == "2025-11-25T00:00:00.000+00:00"


def test_export_selects_by_label_source_since_and_limit(cfg_path: Path, tmp_path: Path) -> None:
    def exported(*args: str) -> list[dict]:
        out = tmp_path / "x" / "-".join(args)
        assert main(["--config", str(cfg_path), "samples", "export", str(out), *args]) == 0
        return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]

    assert [r["prediction"] for r in exported("--label", "unlabelled")] == [0.5, 0.45, 0.05, 0.95, 0.42]
    assert [r["testnet_label"] for r in exported("--label", "testnet")] == [1, 0]
    assert len(exported("--label", "labelled")) == 3
    assert [r["prediction"] for r in exported("--source", "random")] == [0.05, 0.95]
    assert [r["prediction"] for r in exported("--since", "2025-11-26")] == [0.55, 0.1, 0.95, 0.42]
    assert [r["prediction"] for r in exported("--label", "unlabelled", "--source", "band", "--limit", "2")] == [
        0.5,
        0.45,
    ]


def test_since_accepts_durations_and_iso_times() -> None:
    assert parse_since("36h", now=1000_000.0) == 1000_000.0 - 36 * 3600
    assert parse_since("7d", now=1000_000.0) == 1000_000.0 - 7 * DAY
    assert parse_since("2025-11-25") == T0
    assert parse_since("2025-11-25T01:00+01:00") == T0
    with pytest.raises(ValueError, match=r"--since: expected e\.g\. 24h"):
        parse_since("yesterday")


def test_errors_name_the_file_or_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = config_file(tmp_path)
    assert main(["--config", str(cfg), "samples"]) == 1
    assert f"no samples database at {tmp_path / 'state' / 'samples.db'}" in capsys.readouterr().err
    fill(tmp_path / "state" / "samples.db")
    assert main(["--config", str(cfg), "samples", "export", str(tmp_path / "o"), "--since", "soon"]) == 2
    assert "--since: expected" in capsys.readouterr().err


def test_it_reads_while_a_writer_holds_the_database(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    writer = sqlite3.connect(cfg_path.parent / "state" / "samples.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("DELETE FROM samples")
    assert main(["--config", str(cfg_path), "samples", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 8  # the last committed state, no waiting
    writer.execute("ROLLBACK")
    writer.close()


def test_the_database_follows_the_state_dir_unless_named(tmp_path: Path) -> None:
    from svd.config import config_from_dict

    assert config_from_dict({}, base_dir=tmp_path).samples_db == tmp_path / "state" / "samples.db"
    moved = config_from_dict({"daemon": {"state_dir": "/var/lib/svd"}}, base_dir=tmp_path)
    assert moved.samples_db == Path("/var/lib/svd/samples.db")
    named = config_from_dict({"samples": {"db": "data/s.db"}}, base_dir=tmp_path)
    assert named.samples_db == tmp_path / "data" / "s.db"


def test_export_skips_a_row_whose_hash_or_format_could_name_another_path(
    cfg_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = sqlite3.connect(tmp_path / "state" / "samples.db")
    # Crafted rows: a "hash" that walks out of the export folder, and a format that does.
    crafted = [("evil-sha", "../../escaped", "jpeg"), ("evil-fmt", "ab" * 32, "jpg/../../escaped")]
    for uid, sha, fmt in crafted:
        conn.execute("INSERT INTO images VALUES (?, x'ffd8ff00', ?, 4, ?)", (sha, fmt, T0))
        conn.execute(
            "INSERT INTO samples (uid, image_sha256, received_at, caller_hotkey, prediction, engine, engine_version,"
            " backbone_sha256, features, feature_dim, source) VALUES (?, ?, ?, 'hk', 0.5, 'd', '1', 'bb',"
            " x'00000000', 1, 'band')",
            (uid, sha, T0 + 5 * DAY),
        )
    conn.commit()
    conn.close()
    out = tmp_path / "a" / "b" / "out"
    assert main(["--config", str(cfg_path), "samples", "export", str(out)]) == 0
    captured = capsys.readouterr()
    assert "8 samples exported" in captured.out
    assert "2 samples skipped" in captured.err and "evil-sha, evil-fmt" in captured.err, captured.err
    assert not list(tmp_path.rglob("escaped*"))
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert not {"evil-sha", "evil-fmt"} & {r["uid"] for r in index}


def empty_db(tmp_path: Path, **samples: object) -> Path:
    """A config file (samples keys as given) and an empty samples.db, as a fresh daemon leaves it."""
    from svd.samples.db import connect

    path = tmp_path / "svd.toml"
    tmp_path.mkdir(exist_ok=True)
    path.write_text("[samples]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in samples.items()))
    (tmp_path / "state").mkdir()
    connect(tmp_path / "state" / "samples.db").close()
    return path


def test_no_sample_without_a_daemon_says_what_the_config_keeps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = empty_db(tmp_path, band_low=0.4, band_high=0.6, random_rate=0.05)
    assert main(["--config", str(cfg), "samples"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["no samples stored", "why none:"]
    assert lines[2].startswith(f"  no daemon answers on {tmp_path / 'state' / 'svd.sock'}: it counts why")
    assert lines[3:] == [
        "  answers to the development key (//Alice, what svd bench signs with) are never kept"
        " ([samples] keep_dev_key = false)",
        "  confident answers (outside the band 0.4..0.6) are kept only at [samples] random_rate 0.05,"
        " unless they carry a testnet label",
    ]
    assert main(["--config", str(empty_db(tmp_path / "kept", keep_dev_key=True)), "samples"]) == 0
    assert "development key" not in capsys.readouterr().out


def test_samples_off_is_the_reason_with_or_without_a_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = empty_db(tmp_path, enabled=False)
    assert main(["--config", str(cfg), "samples", "--json"]) == 0
    why = json.loads(capsys.readouterr().out)["why"]
    assert why == [
        "samples are off ([samples] enabled = false): svd keeps no answer; set [samples] enabled = true and restart svd"
    ]
    for name in ("samples.db", "samples.db-wal", "samples.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    assert main(["--config", str(cfg), "samples"]) == 1
    assert "svd samples: samples are off ([samples] enabled = false)" in capsys.readouterr().err


def test_many_samples_need_no_reason(cfg_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_path.write_text(cfg_path.read_text() + "[train]\nmin_images = 8\n")  # the fixture stored 8
    assert main(["--config", str(cfg_path), "samples", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["why"] == []
    cfg_path.write_text(cfg_path.read_text().replace("min_images = 8", "min_images = 9"))
    assert main(["--config", str(cfg_path), "samples"]) == 0
    assert "why only 8:\n  no daemon answers on" in capsys.readouterr().out


def test_the_daemons_counters_name_each_reason() -> None:
    from svd.config import config_from_dict
    from svd.samples.cli import why_few

    cfg = config_from_dict({"samples": {"band_low": 0.45, "band_high": 0.55, "random_rate": 0.0}})
    counted = {
        "enabled": True,
        "offered": 10,
        "skipped_dev_key": 2,
        "kept": 5,
        "dropped_full": 4,
        "dropped_errors": 1,
        "last_error": "OSError: disk full",
        "errored": None,
    }
    assert why_few(cfg, counted) == [
        "2 of its 10 answers went to the development key (//Alice, what svd bench signs with):"
        " never kept unless [samples] keep_dev_key = true",
        "3 of its 10 answers were not kept: confident answers (outside the band 0.45..0.55) are kept only at"
        " [samples] random_rate 0, unless they carry a testnet label",
        "4 kept answers dropped with the queue full ([samples] queue_max, queue_max_bytes)",
        "1 kept answers lost to write errors (last: OSError: disk full)",
    ]
    assert why_few(cfg, {"enabled": True, "offered": 0}) == [
        "the running daemon has answered no query since it started: there was nothing to keep"
    ]
    assert why_few(cfg, {"enabled": False}) == [
        "samples are off (the running daemon started with them off): svd keeps no answer;"
        " set [samples] enabled = true and restart svd"
    ]
