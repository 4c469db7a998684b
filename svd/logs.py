"""structlog setup: JSON lines under systemd (journald keeps stdout), console on a terminal."""

from __future__ import annotations

import logging
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog once for the process.

    Args:
        level: one of LEVELS.
        fmt: "json", "console", or "auto" (console when stdout is a terminal).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=False,
    )
    # aiohttp logs a traceback for every unparsable request a client sends; a
    # flood of garbage would flood the journal. Our handler logs its own errors.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
