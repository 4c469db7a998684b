"""The samples database file: settings, schema version, forward migrations, refusals."""

import sqlite3
from pathlib import Path

import pytest

from svd.samples import db


def test_a_new_database_is_wal_incremental_and_at_the_current_version(tmp_path: Path) -> None:
    path = tmp_path / "state" / "samples.db"
    conn = db.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # INCREMENTAL
    assert conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == db.BUSY_TIMEOUT_MS
    assert db.schema_version(conn) == db.SCHEMA_VERSION == 1
    columns = {r[1] for r in conn.execute("PRAGMA table_info(samples)")}
    assert {"uid", "image_sha256", "features", "feature_dim", "testnet_label", "review_label", "reviewer"} <= columns
    indexes = {r[1] for r in conn.execute("PRAGMA index_list(samples)")}
    assert {"samples_received_at", "samples_review_label", "samples_image_sha256"} <= indexes
    conn.close()
    # Opening again applies nothing and keeps the one version row.
    again = db.connect(path)
    assert again.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    again.close()


def test_samples_refer_to_images(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "s.db")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        conn.execute(
            "INSERT INTO samples (uid, image_sha256, received_at, caller_hotkey, prediction, engine, engine_version,"
            " backbone_sha256, features, feature_dim, source)"
            " VALUES ('u', 'nope', 0, 'h', 0.5, 'e', 'v', 'b', x'', 0, 'band')"
        )


def test_an_older_database_is_upgraded_forward_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    v1 = db.connect(path)
    v1.execute("INSERT INTO images VALUES ('aa', x'00', 'jpeg', 1, 1.0)")
    v1.close()
    # A later svd adds a step: the v1 file gains it, in place.
    v2_steps = (
        *db.MIGRATIONS,
        ("ALTER TABLE images ADD COLUMN width INTEGER", "CREATE INDEX images_w ON images(width)"),
    )
    v2 = db.connect(path, v2_steps)
    assert db.schema_version(v2) == 2
    assert v2.execute("SELECT sha256, width FROM images").fetchall() == [("aa", None)]
    assert [r[0] for r in v2.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
    v2.close()


def test_a_version_0_file_gets_the_whole_schema(tmp_path: Path) -> None:
    # A file from before versioning: a database with no schema_version table.
    path = tmp_path / "s.db"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE notes (x)")
    raw.commit()
    raw.close()
    conn = db.connect(path)
    assert db.schema_version(conn) == db.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM samples").fetchone()[0] == 0
    conn.close()


def test_a_failing_step_leaves_the_version_before_it(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db.connect(path).close()
    broken = (*db.MIGRATIONS, ("CREATE TABLE extra (x)", "THIS IS NOT SQL"))
    with pytest.raises(sqlite3.OperationalError):
        db.connect(path, broken)
    conn = db.connect(path)
    assert db.schema_version(conn) == 1
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'extra'").fetchone() is None  # rolled back whole
    conn.close()


def test_a_newer_database_is_refused_with_a_message(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    conn = db.connect(path)
    conn.execute("INSERT INTO schema_version VALUES (7, 0)")
    conn.close()
    with pytest.raises(db.DatabaseError, match=r"schema version 7 is newer than this svd knows \(1\): upgrade svd"):
        db.connect(path)
    with pytest.raises(db.DatabaseError, match="schema version 7, this svd reads version 1: upgrade svd"):
        db.connect_readonly(path)


def test_not_a_database_and_missing_file_are_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(db.DatabaseError, match=f"{junk}: cannot open it as a samples database"):
        db.connect(junk)
    with pytest.raises(db.DatabaseError, match="no samples database at"):
        db.connect_readonly(tmp_path / "missing.db")


async def test_the_async_writer_connection_needs_a_migrated_file(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    sqlite3.connect(path).close()
    with pytest.raises(db.DatabaseError, match="cannot open it as a samples database"):
        await db.connect_async(path)
    db.connect(path).close()
    conn = await db.connect_async(path)
    assert list(await conn.execute_fetchall("PRAGMA foreign_keys")) == [(1,)]
    await conn.close()


def test_readers_see_the_database_while_a_writer_holds_a_transaction(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    writer = db.connect(path)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO images VALUES ('aa', x'00', 'jpeg', 1, 1.0)")
    reader = db.connect_readonly(path)
    assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 0  # WAL: the last commit, no wait
    writer.execute("COMMIT")
    assert reader.execute("SELECT count(*) FROM images").fetchone()[0] == 1
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("DELETE FROM images")
    reader.close()
    writer.close()


def test_connect_existing_writes_but_never_creates_or_migrates(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with pytest.raises(db.DatabaseError, match=r"no samples database at .*s\.db"):
        db.connect_existing(path)
    assert not path.exists()
    db.connect(path).close()
    conn = db.connect_existing(path)
    conn.execute("INSERT INTO images VALUES ('a', x'00', 'jpeg', 1, 0)")  # writable
    conn.execute("DELETE FROM schema_version WHERE version = ?", (db.SCHEMA_VERSION,))  # now an older file
    conn.close()
    with pytest.raises(db.DatabaseError, match=rf"schema version {db.SCHEMA_VERSION - 1}, .* start the daemon once"):
        db.connect_existing(path)
    raw = sqlite3.connect(path)
    assert db.schema_version(raw) == db.SCHEMA_VERSION - 1  # left as it was: not migrated
    raw.execute("INSERT INTO schema_version VALUES (99, 0)")
    raw.commit()
    raw.close()
    with pytest.raises(db.DatabaseError, match=r"schema version 99, .*: upgrade svd"):
        db.connect_existing(path)
