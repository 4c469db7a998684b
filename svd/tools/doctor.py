"""`svd doctor`: what an operator gets wrong, one line per check, each with its fix.

This module is the command (arguments, output); the checks are in
svd/tools/doctor_checks.py, imported when the command runs, since they load
the engine's libraries and every `svd` command parses this module's arguments.
Both take the Check line from svd/tools/doctor_verdict.py, so neither imports
the other at load time.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from svd.config import Config, ConfigError, config_file
from svd.tools.doctor_verdict import Check

if TYPE_CHECKING:
    from svd.serve.chain import ChainSource

STATUS_WIDTH, NAME_WIDTH = 6, 14


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`svd doctor` flags; sets run_doctor as the command."""
    parser.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    parser.set_defaults(func=run_doctor)


def run_doctor(args: argparse.Namespace, cfg: Config, *, chain: ChainSource | None = None) -> int:
    """Print every check; 0 when none failed, 1 otherwise.

    Args:
        args: `json` (bool) and the top-level `config` (the --config path, or None).
        cfg: the loaded configuration.
        chain: the chain read in online mode; by default bittensor 11 on chain.network.
    """
    # The checks import the engine (torch): only when the command runs, not for every `svd ...`.
    from svd.tools.doctor_checks import run_checks

    checks = run_checks(cfg, _config_path(args.config), chain=chain)
    _print(checks, as_json=args.json)
    return 1 if any(c.status == "fail" for c in checks) else 0


def doctor_config_error(path: Path | None, error: ConfigError, *, as_json: bool = False) -> int:
    """For cli.py when the config does not load: its fail line (every other check needs a config); 1."""
    where = _config_path(path) or "built-in defaults"
    fix = "correct that key (the repository's config.toml shows every key, commented), then rerun svd doctor"
    _print([Check("config", "fail", f"{where}: {error}", fix)], as_json=as_json)
    return 1


def render(checks: list[Check]) -> str:
    """Aligned lines; a warn or fail line is followed by its indented `fix:` line (a fix of several lines
    continues under its first)."""
    lines = []
    for c in checks:
        lines.append(f"{c.status:<{STATUS_WIDTH}}{c.name:<{NAME_WIDTH}}{c.detail}")
        if c.status != "ok" and c.fix:
            fix = c.fix.replace("\n", "\n" + " " * (STATUS_WIDTH + len("fix: ")))
            lines.append(f"{'':<{STATUS_WIDTH}}fix: {fix}")
    return "\n".join(lines)


def _print(checks: list[Check], as_json: bool) -> None:
    if as_json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
        return
    warns, fails = (sum(c.status == s for c in checks) for s in ("warn", "fail"))
    print(f"{render(checks)}\n\n{len(checks)} checks: {fails} failed, {warns} warnings")


def _config_path(given: Path | None) -> Path | None:
    """config_file(given), as an absolute path: doctor's lines name the file wherever it was run."""
    path = config_file(given)
    return path.resolve() if path is not None else None
