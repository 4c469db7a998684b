"""The samples database: SQLite file settings, schema version and forward migrations.

One file (default state/samples.db) in WAL mode: the daemon's one writer and
any number of readers (`svd samples`, `svd review`) work at once. Migrations
run through plain sqlite3 (from a thread in the daemon, directly in the CLI);
the daemon then writes through aiosqlite so the event loop never waits on disk.
"""

from __future__ import annotations

import os
import re
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module; only the daemon needs aiosqlite
    import aiosqlite

BUSY_TIMEOUT_MS = 5_000
# images.format as the writer stores it (PIL's name, lower case) -> file suffix of an exported image.
IMAGE_SUFFIXES = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
# Export file names are built from images.sha256: only values of this shape become a path.
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# samples.source: why an answer was kept (svd/samples/log.py SamplePolicy).
SOURCE_BAND, SOURCE_TESTNET, SOURCE_RANDOM = "band", "testnet", "random"
SOURCES = (SOURCE_BAND, SOURCE_TESTNET, SOURCE_RANDOM)
# A sample's label: a human review wins over the testnet label; NULL when it has neither.
LABEL_SQL = "COALESCE(review_label, testnet_label)"
# Bytes in pages holding data (images, features, indexes); free pages not counted.
USED_BYTES_SQL = (
    "SELECT (page_count - freelist_count) * page_size FROM pragma_page_count, pragma_freelist_count, pragma_page_size"
)
# Settings that last only as long as one connection, so every connection sets them.
CONNECTION_PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    # In WAL mode NORMAL loses no committed transaction when the process dies;
    # only a power cut can take the last ones back.
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    # The WAL is truncated back to 64 MiB after a checkpoint, so it cannot stay large.
    "PRAGMA journal_size_limit = 67108864",
)

# MIGRATIONS[i] takes a database from version i to i + 1; version 0 is an empty file.
# Each step runs in its own transaction. Never edit a released step: append one.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE images (
            sha256 TEXT PRIMARY KEY,
            data BLOB NOT NULL,
            format TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            first_seen REAL NOT NULL
        )""",
        """CREATE TABLE samples (
            id INTEGER PRIMARY KEY,
            uid TEXT NOT NULL UNIQUE,
            image_sha256 TEXT NOT NULL REFERENCES images(sha256),
            received_at REAL NOT NULL,
            caller_hotkey TEXT NOT NULL,
            prediction REAL NOT NULL,
            engine TEXT NOT NULL,
            engine_version TEXT NOT NULL,
            backbone_sha256 TEXT NOT NULL,
            features BLOB NOT NULL,
            feature_dim INTEGER NOT NULL,
            source TEXT NOT NULL,
            testnet_label INTEGER,
            review_label INTEGER,
            reviewed_at REAL,
            reviewer TEXT
        )""",
        "CREATE INDEX samples_received_at ON samples(received_at)",
        "CREATE INDEX samples_review_label ON samples(review_label)",
        "CREATE INDEX samples_image_sha256 ON samples(image_sha256)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class DatabaseError(Exception):
    """The samples database cannot be used; the message names the file and the fix."""


def connect(path: Path, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> sqlite3.Connection:
    """Open (creating if needed) and migrate the database at `path`: the CLI and tests use this.

    The connection is in autocommit mode (isolation_level=None): callers open
    their own transactions with BEGIN.

    Raises:
        DatabaseError: the file is not a database, or its schema is newer than this code.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        _configure(conn, path)
        migrate(conn, path, migrations)
    except BaseException:
        conn.close()
        raise
    return conn


def connect_readonly(path: Path) -> sqlite3.Connection:
    """A reader that never creates or migrates anything (`svd samples` on a live daemon's file).

    Raises:
        DatabaseError: no such file, or a schema this code does not know.
    """
    return _open_existing(path, "ro")


def connect_existing(path: Path) -> sqlite3.Connection:
    """A writer for an existing database that never creates or migrates it (`svd review import`).

    A daemon of another version may be running on the file: migrating under it
    would break it, so a version mismatch is refused instead.

    Raises:
        DatabaseError: no such file, or a schema version other than this code's.
    """
    return _open_existing(path, "rw")


def _open_existing(path: Path, mode: str) -> sqlite3.Connection:
    if not path.is_file():
        raise DatabaseError(f"no samples database at {path} (samples.db in the config)")
    uri = f"file:{path}?mode={mode}"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        for pragma in CONNECTION_PRAGMAS if mode == "rw" else CONNECTION_PRAGMAS[:1]:
            conn.execute(pragma)
        version = schema_version(conn)
        if version != SCHEMA_VERSION:
            raise DatabaseError(
                f"{path}: schema version {version}, this svd reads version {SCHEMA_VERSION}"
                + (": upgrade svd" if version > SCHEMA_VERSION else ": start the daemon once to migrate it")
            )
    except sqlite3.DatabaseError as e:
        conn.close()
        raise DatabaseError(f"{path}: cannot read it as a samples database ({e})") from e
    except BaseException:
        conn.close()
        raise
    return conn


async def connect_async(path: Path) -> aiosqlite.Connection:
    """The daemon's writer connection; run connect() (which migrates) first.

    Raises:
        DatabaseError: the file is not a database or has the wrong schema version.
    """
    import aiosqlite

    conn = await aiosqlite.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
    try:
        for pragma in CONNECTION_PRAGMAS:
            await conn.execute(pragma)
        async with conn.execute("SELECT max(version) FROM schema_version") as cur:
            version = await cur.fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise DatabaseError(f"{path}: not migrated to schema version {SCHEMA_VERSION}; open it with connect()")
    except sqlite3.DatabaseError as e:
        await conn.close()
        raise DatabaseError(f"{path}: cannot open it as a samples database ({e})") from e
    except BaseException:
        await conn.close()
        raise
    return conn


def schema_version(conn: sqlite3.Connection) -> int:
    """The version recorded in schema_version; 0 for a database without the table."""
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'").fetchone()
    if not exists:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    return int(row[0] or 0)


def migrate(conn: sqlite3.Connection, path: Path, migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Apply the steps this database lacks, each in its own transaction; returns the version reached.

    Raises:
        DatabaseError: the database is newer than `migrations` knows.
    """
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    current = schema_version(conn)
    if current > len(migrations):
        raise DatabaseError(
            f"{path}: schema version {current} is newer than this svd knows ({len(migrations)}): "
            "upgrade svd, or move the file away to start a new one"
        )
    for version in range(current + 1, len(migrations) + 1):
        # IMMEDIATE takes the write lock first, so two processes cannot both apply a step.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) >= version:  # another process got there first
                conn.execute("ROLLBACK")
                continue
            for statement in migrations[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return max(current, len(migrations))


def used_bytes(conn: sqlite3.Connection) -> int:
    """Bytes in pages holding data (images, features, indexes); free pages not counted."""
    return int(conn.execute(USED_BYTES_SQL).fetchone()[0] or 0)


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        fresh = conn.execute("PRAGMA page_count").fetchone()[0] == 0
    except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
        raise DatabaseError(f"{path}: cannot open it as a samples database ({e})") from e
    if fresh:
        # auto_vacuum only takes effect before the first table exists; INCREMENTAL
        # lets retention hand freed pages back to the file system.
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode != "wal":
        raise DatabaseError(f"{path}: cannot switch to WAL mode (got {mode}); is it on a network file system?")
    for pragma in CONNECTION_PRAGMAS:
        conn.execute(pragma)


def write_image_file(conn: sqlite3.Connection, sha: str, path: Path) -> bool:
    """Writes image `sha` to `path` unless a file is there already; True if written.

    Renamed into place, so a crash never leaves a truncated file that a later export would keep.
    """
    if path.is_file():
        return False
    (data,) = conn.execute("SELECT data FROM images WHERE sha256 = ?", (sha,)).fetchone()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True
