"""A private virtualenv with bittensor 9.12.2, for wire-compatibility tests.

svd must answer the dendrites validators really run, so tests drive it with
bittensor 9.12.2 itself (tests/bt9_client.py). bittensor pins its own
dependency versions, so it lives in a virtualenv of its own, built once per
cache folder and reused. Nothing here is a pytest fixture; tests call
`ensure_bt9_python` (from a session fixture, say) and `run_bt9_client`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BT9_REQUIREMENTS: tuple[str, ...] = ("bittensor==9.12.2", "async-substrate-interface<2")
BT9_CLIENT = Path(__file__).resolve().parent / "bt9_client.py"
MARKER_NAME = "svd-bt9-requirements.txt"
INSTALL_TIMEOUT_S = 1200.0
TAIL_CHARS = 4000


class Bt9EnvError(RuntimeError):
    """The bittensor 9.12.2 virtualenv could not be built, or the client failed."""


def _tail(output: str | bytes | None) -> str:
    text = output.decode(errors="replace") if isinstance(output, bytes) else output or ""
    return text[-TAIL_CHARS:]


def _scratch_env(home: Path) -> dict[str, str]:
    """The environment for bt9 processes: importing bittensor creates
    ~/.bittensor, so HOME points at a scratch folder; nothing from svd's own
    virtualenv leaks in."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["HOME"] = str(home)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], what: str, env: dict[str, str], timeout: float) -> None:
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = _tail(e.stdout) + _tail(e.stderr)
        raise Bt9EnvError(f"{what} timed out after {timeout:.0f}s:\n{output}") from e
    if proc.returncode != 0:
        output = _tail(proc.stdout + proc.stderr)
        raise Bt9EnvError(f"{what} failed (exit {proc.returncode}):\n{output}")


def ensure_bt9_python(cache_dir: Path, *, timeout: float = INSTALL_TIMEOUT_S) -> Path:
    """Return the python of `cache_dir/bt9-venv`, building the virtualenv first
    unless an earlier call finished it with the same requirements.

    Safe to call from parallel processes: an exclusive lock on
    `cache_dir/bt9-venv.lock` serialises the build. Raises Bt9EnvError, with
    the tail of pip's output, when the build fails.
    """
    cache_dir = Path(cache_dir).resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    venv_dir = cache_dir / "bt9-venv"
    python = venv_dir / "bin" / "python"
    marker = venv_dir / MARKER_NAME
    wanted = "\n".join(BT9_REQUIREMENTS) + "\n"

    with open(cache_dir / "bt9-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and marker.is_file() and marker.read_text() == wanted:
            return python
        # Missing, stale, or left half-built by a killed run: start over.
        shutil.rmtree(venv_dir, ignore_errors=True)
        home = cache_dir / "bt9-home"
        home.mkdir(exist_ok=True)
        env = _scratch_env(home)
        _run([sys.executable, "-m", "venv", str(venv_dir)], "creating the bt9 virtualenv", env, timeout)
        pip_install = [str(python), "-m", "pip", "install", "--no-input", *BT9_REQUIREMENTS]
        _run(pip_install, "pip install " + " ".join(BT9_REQUIREMENTS), env, timeout)
        _run([str(python), "-c", "import bittensor"], "importing bittensor 9.12.2", env, timeout)
        marker.write_text(wanted)
    return python


def run_bt9_client(python: Path, *args: str, timeout: float) -> list[dict[str, Any]]:
    """Run tests/bt9_client.py with `python` (from ensure_bt9_python) and
    return the JSON objects it printed, one per HTTP request it made.

    Raises Bt9EnvError, with the client's stderr, if it exits non-zero or
    runs past `timeout` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="bt9-home-") as home:
        cmd = [str(python), "-I", str(BT9_CLIENT), *args]
        try:
            env = _scratch_env(Path(home))
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise Bt9EnvError(f"bt9_client timed out after {timeout:.0f}s:\n{_tail(e.stderr)}") from e
    if proc.returncode != 0:
        raise Bt9EnvError(f"bt9_client failed (exit {proc.returncode}):\n{_tail(proc.stderr)}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
