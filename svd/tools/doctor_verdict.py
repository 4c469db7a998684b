"""What a check of `svd doctor` says: its Verdict, and the named Check line it becomes.

Its own small module so that the command (svd/tools/doctor.py) and the checks
(svd/tools/doctor_checks.py) share these types without importing each other:
the command imports the checks only when it runs, since they load the
engine's libraries, and every `svd` command parses the command's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class Verdict(NamedTuple):
    """What one check found: status "ok", "warn" or "fail", and for warn and fail what to do."""

    status: str
    detail: str
    fix: str = ""


def ok(detail: str) -> Verdict:
    return Verdict("ok", detail)


def warn(detail: str, fix: str) -> Verdict:
    return Verdict("warn", detail, fix)


def fail(detail: str, fix: str) -> Verdict:
    return Verdict("fail", detail, fix)


@dataclass(frozen=True)
class Check:
    """One line of `svd doctor`: status "ok", "warn" or "fail"; fix says what to do (empty for ok)."""

    name: str
    status: str
    detail: str
    fix: str = ""
