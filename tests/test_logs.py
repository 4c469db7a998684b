"""svd.logs: syslog priorities for journald, and other libraries' records as the same JSON lines.

The journal is simulated the way systemd sets it up: stdout is a file whose
"device:inode" is in $JOURNAL_STREAM. Each case runs in a fresh interpreter,
since setup_logging configures the whole process.
"""

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from svd.logs import JournalPrefix, stream_is_journal

ROOT = Path(__file__).resolve().parent.parent
PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
EACH_LEVEL = """
    import structlog
    log = structlog.get_logger("svd.test")
    for level in ("debug", "info", "warning", "error", "critical"):
        getattr(log, level)("event_at_" + level, n=1)
"""


def run_logging(out: Path, body: str, journal_stream: str | None, setup: str = 'setup_logging("debug", "json")') -> str:
    """Run `body` after `setup` in a child whose stdout appends to `out`; returns what it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}  # the test runner may sit under systemd
    if journal_stream is not None:
        env["JOURNAL_STREAM"] = journal_stream
    code = f"from svd.logs import setup_logging\n{setup}\n{textwrap.dedent(body)}"
    with out.open("a") as stdout:
        subprocess.run([sys.executable, "-c", code], stdout=stdout, env=env, cwd=ROOT, check=True, timeout=60)
    return out.read_text()


def dev_inode(path: Path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


def test_each_level_gets_its_syslog_priority_when_stdout_is_the_journal(tmp_path: Path) -> None:
    out = tmp_path / "journal"
    out.touch()
    lines = run_logging(out, EACH_LEVEL, journal_stream=dev_inode(out)).splitlines()
    assert len(lines) == 5
    for line, level in zip(lines, PRIORITY, strict=True):
        prefix = f"<{PRIORITY[level]}>"
        assert line.startswith(prefix), line
        event = json.loads(line.removeprefix(prefix))
        assert event["level"] == level and event["event"] == f"event_at_{level}" and event["n"] == 1


@pytest.mark.parametrize(
    "journal_stream",
    [None, "", "not:numbers", "12345", "other-file"],
    ids=["unset", "empty", "garbage", "no-inode", "another-file"],
)
def test_no_prefix_when_stdout_is_not_the_journal(tmp_path: Path, journal_stream: str | None) -> None:
    out = tmp_path / "plain.log"
    if journal_stream == "other-file":
        (tmp_path / "elsewhere").touch()
        journal_stream = dev_inode(tmp_path / "elsewhere")
    lines = run_logging(out, EACH_LEVEL, journal_stream).splitlines()
    assert [json.loads(line)["level"] for line in lines] == list(PRIORITY)


def test_no_prefix_on_a_pipe_even_inside_a_unit(tmp_path: Path) -> None:
    """A unit that pipes svd's stdout elsewhere keeps $JOURNAL_STREAM but not the stream."""
    decoy = tmp_path / "journal"
    decoy.touch()
    env = {**os.environ, "JOURNAL_STREAM": dev_inode(decoy)}
    code = 'from svd.logs import setup_logging\nsetup_logging("info", "auto")\n' + textwrap.dedent(EACH_LEVEL)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True, timeout=60
    )
    assert [json.loads(line)["level"] for line in result.stdout.splitlines()] == [
        "info",
        "warning",
        "error",
        "critical",
    ]


def test_library_records_come_out_as_json_lines_with_their_level(tmp_path: Path) -> None:
    body = """
        import logging
        logging.getLogger("aiohttp.client").warning("connection to %s lost", "validator")
        try:
            raise ValueError("bad job")
        except ValueError:
            logging.getLogger("apscheduler.executors.default").exception("Job raised")
        logging.getLogger("onnx_ir.passes").info("Replaced initializer")  # chatter below WARNING
        logging.getLogger("aiohttp.server").error("Error handling request")  # silenced per-request tracebacks
    """
    out = tmp_path / "journal"
    out.touch()
    lines = run_logging(out, body, journal_stream=dev_inode(out), setup='setup_logging("info", "json")').splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<3>"]
    warning, error = (json.loads(line[3:]) for line in lines)
    assert warning == {
        "event": "connection to validator lost",
        "level": "warning",
        "timestamp": warning["timestamp"],
        "logger": "aiohttp.client",
    }
    assert error["level"] == "error" and error["logger"] == "apscheduler.executors.default"
    assert error["event"] == "Job raised" and "ValueError: bad job" in error["exception"]


def test_library_info_stays_out_even_when_the_library_sets_its_own_level(tmp_path: Path) -> None:
    body = """
        import logging, structlog
        chatty = logging.getLogger("chatty")
        chatty.setLevel(logging.INFO)
        chatty.info("every initializer")
        structlog.get_logger("svd.engine").debug("batch_done", size=3)
    """
    lines = run_logging(tmp_path / "out.log", body, journal_stream=None).splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["batch_done"]


def test_a_second_setup_replaces_the_first(tmp_path: Path) -> None:
    body = """
        import logging, structlog
        setup_logging("warning", "json")
        structlog.get_logger("svd.x").info("quiet")
        structlog.get_logger("svd.x").warning("once")
        logging.getLogger("lib").warning("once too")
    """
    lines = run_logging(tmp_path / "out.log", body, journal_stream=None).splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["once", "once too"]


def test_a_multi_line_console_event_carries_the_prefix_on_every_line() -> None:
    render = JournalPrefix(lambda _logger, _name, _event: "boom\nTraceback (most recent call last):\nValueError")
    assert render(None, "error", {"level": "error"}) == "<3>boom\n<3>Traceback (most recent call last):\n<3>ValueError"
    assert render(None, "info", {}).startswith("<6>")  # no level yet: the method name decides


def test_stream_is_journal_compares_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    path.touch()
    with path.open("w") as stream:
        assert stream_is_journal(stream, {"JOURNAL_STREAM": dev_inode(path)})
        assert not stream_is_journal(stream, {"JOURNAL_STREAM": f"{os.stat(path).st_dev}:1"})
        assert not stream_is_journal(stream, {})
    assert not stream_is_journal(io.StringIO(), {"JOURNAL_STREAM": dev_inode(path)})  # no descriptor at all
