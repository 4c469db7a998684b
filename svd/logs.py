"""structlog setup: JSON lines under systemd (journald keeps stdout), console on a terminal.

Other libraries' stdlib `logging` records (aiohttp, apscheduler, onnx, ...) go
through the same renderer, so the journal holds one format. Under systemd each
line starts with its syslog priority (`<3>{"event": ...}`), which journald
strips and stores as the entry's PRIORITY: `journalctl -u svd -p warning`
then shows warnings and worse.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

import structlog
from structlog.stdlib import ProcessorFormatter
from structlog.typing import EventDict, Processor, WrappedLogger

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# sd-daemon(3) priority prefixes; journald reads them off each stdout line (SyslogLevelPrefix=yes, its default).
SYSLOG_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
DEFAULT_PRIORITY = SYSLOG_PRIORITIES["info"]
# Other libraries are heard from WARNING up (or from daemon.log_level when that is
# stricter). Below it they chatter: building the demo engine logs ~500 INFO lines
# from the ONNX optimizer (onnx_ir, onnxscript), APScheduler logs each job it adds
# and runs, and PIL, aiosqlite and watchfiles log at DEBUG per image, query and poll.
FOREIGN_MIN_LEVEL = logging.WARNING


def stream_is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """Whether `stream` is the journald stream that systemd connected.

    systemd puts "<device>:<inode>" of that stream in $JOURNAL_STREAM; a
    redirect to a file or a pipe inside the unit leaves the variable set but
    changes the stream, so compare the two.
    """
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no descriptor behind it (pytest's capture), or closed
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalPrefix:
    """Renders with `renderer`, then starts each line with the event's syslog priority."""

    def __init__(self, renderer: Processor) -> None:
        self._renderer = renderer

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        prefix = f"<{SYSLOG_PRIORITIES.get(event_dict.get('level', method_name), DEFAULT_PRIORITY)}>"
        text = str(self._renderer(logger, method_name, event_dict))
        # A console-format traceback spans lines, and journald reads a prefix per line.
        return "\n".join(prefix + line for line in text.split("\n"))


class _StdoutHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler on whatever sys.stdout (or sys.stderr) is when a record arrives.

    The daemon never swaps sys.stdout, but in-process tests (pytest's capture)
    do: a handler bound to an old, closed capture would fail on every record.
    """

    def __init__(self, to_stderr: bool = False) -> None:
        super().__init__(sys.stderr if to_stderr else sys.stdout)
        self._to_stderr = to_stderr

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if self._to_stderr else sys.stdout
        super().emit(record)


class _ForeignLevelFilter(logging.Filter):
    """Lets svd's records through and other libraries' from `level` up.

    The root logger's level alone would not do: a library that sets its own
    logger to INFO still propagates INFO records to the root's handler.
    """

    def __init__(self, level: int) -> None:
        super().__init__()
        self._level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self._level or record.name == "svd" or record.name.startswith("svd.")


def setup_logging(level: str = "info", fmt: str = "auto", to_stderr: bool = False) -> None:
    """Configure structlog and the stdlib root logger for the process; calling again replaces the setup.

    Args:
        level: one of LEVELS; svd's own events at this level and above, other
            libraries' at this level or FOREIGN_MIN_LEVEL, whichever is stricter.
        fmt: "json", "console", or "auto" (console when stdout is a terminal).
        to_stderr: log lines on stderr (a one-off command whose stdout carries its result, e.g. --json);
            the daemon logs on stdout, journald's stream.
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    if stream_is_journal(sys.stdout, os.environ):
        renderer = JournalPrefix(renderer)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # svd's events leave through the stdlib handler below too: one lock and one
    # write per line, so lines from different threads never interleave.
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )
    formatter = ProcessorFormatter(
        # Only library records get "logger": svd's lines keep the fields they always had.
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[ProcessorFormatter.remove_processors_meta, structlog.processors.format_exc_info, renderer],
    )
    _route_stdlib(formatter, LEVELS[level], to_stderr)


def _route_stdlib(formatter: logging.Formatter, level: int, to_stderr: bool = False) -> None:
    foreign_level = max(level, FOREIGN_MIN_LEVEL)
    handler = _StdoutHandler(to_stderr)
    handler.setFormatter(formatter)
    handler.addFilter(_ForeignLevelFilter(foreign_level))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdoutHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(foreign_level)
    logging.getLogger("svd").setLevel(level)
    # aiohttp logs a traceback for every unparsable request a client sends; a
    # flood of garbage would flood the journal. Our handler logs its own errors.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
