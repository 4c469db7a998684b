"""Writing engine directories: atomically, so the watcher never sees half an engine.

Parts (bytes, files to copy, or another engine's parts to share) and a
manifest with their hashes go into a dot-named temporary directory beside
the target, are synced, and the directory is renamed into place. Readers
skip dot-names; a failed write removes its temporary directory, and what a
killed writer left is removed at the daemon's next start.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from svd.engine.manifest import MANIFEST_NAME, TEMP_PREFIX, EngineError, Manifest, check_part_names, sha256_file

log = structlog.get_logger(__name__)


def remove_stale_temp_dirs(folder: Path, older_than_s: float = 3600.0) -> list[str]:
    """Removes the dot-named *.tmp folders a killed writer left in `folder`; their names.

    Writers build in such a folder and rename the finished one into place, so a
    leftover is never half of anything visible. Only folders older than
    older_than_s go: a writer in another process (a standalone training run)
    may be filling a fresh one.
    """
    if not folder.is_dir():
        return []
    removed = []
    cutoff = time.time() - older_than_s
    for path in folder.iterdir():
        stale = path.name.startswith(TEMP_PREFIX) and path.name.endswith(".tmp") and path.is_dir()
        if stale and path.stat().st_mtime < cutoff:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if removed:
        log.info("stale_temp_dirs_removed", folder=str(folder), names=removed)
    return removed


@dataclass(frozen=True)
class SharedPart:
    """A part of another engine reused as is: hard-linked where the file system allows
    (engine files are never written after the rename), else copied; `sha256` is the
    source manifest's, not recomputed (hot swap verifies every hash before loading)."""

    path: Path
    sha256: str


def write_engine_dir(target: Path, manifest: Manifest, parts: Mapping[str, Path | bytes | SharedPart]) -> Manifest:
    """Writes an engine directory atomically and returns the manifest as written.

    The parts (bytes, files to copy, or another engine's parts to share) and a
    manifest carrying their hashes are written into a dot-named temporary
    directory beside `target`, synced, then renamed to `target`. On any
    failure the temporary directory is removed.

    Raises:
        EngineError: if `target` exists or a part name is not a plain file name.
    """
    if target.exists():
        raise EngineError(f"{target}: engine directory already exists; engines are immutable")
    check_part_names(str(target), {name: "0" * 64 for name in parts})
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        hashes = {name: _write_part(tmp / name, content) for name, content in parts.items()}
        written = replace(manifest, parts=hashes)
        _write_synced(tmp / MANIFEST_NAME, written.to_json().encode("utf-8"))
        _fsync_dir(tmp)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("engine_dir_written", path=str(target), parts=sorted(hashes))
    return written


def _write_part(path: Path, content: Path | bytes | SharedPart) -> str:
    if isinstance(content, SharedPart):
        try:
            os.link(content.path, path)
        except OSError:  # another file system, or links not allowed: a copy
            _copy_synced(content.path, path)
        return content.sha256
    if isinstance(content, bytes):
        _write_synced(path, content)
    else:
        _copy_synced(content, path)
    return sha256_file(path)


def _copy_synced(source: Path, path: Path) -> None:
    shutil.copyfile(source, path)
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
