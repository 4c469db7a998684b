"""`svd run|status|reload|swap|rollback|unpin|build-engine|train|synth|demo-data|samples|review|publish|...`.

The only place that exits the process."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import structlog

from svd.config import Config, ConfigError, config_file, fallback_config, load_config
from svd.logs import setup_logging

log = structlog.get_logger(__name__)
CONFIG_HELP = "config file (default: ./config.toml if present, else the built-in defaults)"
SWAP_TIMEOUT_S = 600.0
TOOL_COMMANDS = (
    ("bench", "load generator and raw engine ceilings", "svd.tools.bench"),
    ("samples", "stored samples by band, label, source and day; export a selection", "svd.samples.cli"),
    ("review", "label stored samples in the FiftyOne App: export, then import", "svd.samples.review"),
    ("train", "the learning loop: run now, pause, resume, status; or --standalone", "svd.train.cli"),
    ("synth", "synthetic training images as validators make theirs: now, pause, resume, stop", "svd.train.synth.cli"),
    ("demo-data", "write a generated street-scene data set in the NATIX parquet format", "svd.train.demo_data"),
    ("publish", "upload the serving engine's head, manifest and model_card.json to HF", "svd.tools.publish"),
    ("register", "register the miner with NATIX's application server", "svd.tools.register"),
    ("doctor", "check config, state dir, hotkey, port, engine, chain and data; with fixes", "svd.tools.doctor"),
    ("swapbench", "ten engine swaps and a rollback under load; longest pause", "svd.tools.swapbench"),
)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.config_path = config_file(args.config)
    try:
        cfg = load_config(args.config_path)
    except ConfigError as e:
        from svd.tools.doctor import doctor_config_error, run_doctor

        if args.func is run_doctor:
            return doctor_config_error(args.config, e, as_json=args.json)
        if args.func is _reload and args.config_path is not None:  # the daemon says what is wrong, and logs it
            return _reload(args, fallback_config(args.config_path))
        if args.func is _status and args.config_path is not None:  # a bad edit must not hide a running daemon
            print(f"svd: {args.config_path} does not load ({e}); asking the daemon anyway", file=sys.stderr)
            return _status(args, fallback_config(args.config_path))
        print(f"svd: invalid configuration: {e}", file=sys.stderr)
        return 2
    result: int = args.func(args, cfg)
    return result


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default, unless there is none to show or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


class _Commands:
    """add_parser with what every command shares: --config (before or after the command's name)
    and help that shows each option's default."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._common = argparse.ArgumentParser(add_help=False)
        # SUPPRESS: given after the command it wins; not given, the top level's value stays.
        self._common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = self._sub.add_parser(
            name, parents=[self._common], formatter_class=_HelpFormatter, **kwargs
        )
        return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd", description="NATIX StreetVision miner daemon")
    parser.add_argument("--config", type=Path, default=None, help=CONFIG_HELP)
    sub = _Commands(parser.add_subparsers(required=True, metavar="COMMAND"))

    run = sub.add_parser("run", help="run the miner daemon")
    run.set_defaults(func=_run)

    status = sub.add_parser("status", help="show the running daemon's status")
    status.add_argument("--json", action="store_true", help="print the raw snapshot as JSON")
    status.set_defaults(func=_status)

    reload = sub.add_parser("reload", help="re-read the running daemon's config file, as SIGHUP does")
    reload.set_defaults(func=_reload)

    swap = sub.add_parser("swap", help="serve engines/NAME now and pin it (no automatic swaps)")
    swap.add_argument("name", help="engine directory name in engines/")
    swap.set_defaults(func=_swap)

    rollback = sub.add_parser("rollback", help="serve the engine created before the serving one, and pin it")
    rollback.set_defaults(func=_rollback)

    unpin = sub.add_parser("unpin", help="let newer engines in engines/ swap in again")
    unpin.set_defaults(func=_unpin)

    build = sub.add_parser("build-engine", help="build an engine directory into engines/")
    build.add_argument("--demo", action="store_true", help="tiny random DINOv3 backbone and head (no download)")
    build.add_argument("--ensemble", action="store_true", help="with --demo: tiny DINOv3 + tiny SigLIP2 ensemble")
    build.add_argument(
        "--head",
        type=Path,
        help="trained head.safetensors (one member MLP per --backbone); without it the engine's head is "
        "untrained (answers 0.5) until a training run gives it one",
    )
    build.add_argument(
        "--classifier",
        metavar="REPO",
        help="import a ViT image classifier (hub id or folder), e.g. natix-network-org/roadwork, as an engine",
    )
    build.add_argument("--positive-label", default=None, help="with --classifier: the roadwork label's name")
    build.add_argument(
        "--backbone",
        action="append",
        default=[],
        metavar="ID",
        help="hub id, e.g. facebook/dinov3-vitl16-pretrain-lvd1689m or google/siglip2-so400m-patch14-384; "
        "repeat for an ensemble (order = head member order)",
    )
    build.add_argument("--name", default=None, help="engine directory name (demo: 'demo')")
    build.add_argument("--version", default="0.1.0", help="engine version recorded in the manifest")
    build.add_argument("--flip-tta", action="store_true", help="average each image's prob with its mirror's")
    build.add_argument("--threshold", type=float, default=0.5, help="decision threshold on the calibrated prob")
    build.add_argument(
        "--mapping",
        default="squash",
        help="squash | letterbox | center_crop: how a query image of any size becomes the 224x224 input, "
        "for serving and training alike (docs/engine-format.md)",
    )
    build.add_argument("--resample", default="bilinear", help="bilinear | bicubic")
    build.set_defaults(func=_build_engine)

    # Commands whose module owns its arguments: (name, help, module with add_arguments()).
    # Each module imports its heavy libraries only when its command runs.
    for name, help_text, module in TOOL_COMMANDS:
        importlib.import_module(module).add_arguments(sub.add_parser(name, help=help_text))
    return parser


def _run(args: argparse.Namespace, cfg: Config) -> int:
    from svd.daemon import Daemon
    from svd.engine.load import EngineError
    from svd.process import StartupError
    from svd.serve.wallet import WalletError

    setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    where = str(args.config_path.resolve()) if args.config_path else "built-in defaults"
    log.info("config", path=where, state_dir=str(cfg.state_dir), engines_dir=str(cfg.engines_dir))
    if args.config_path is None:
        log.warning(
            "no_config_file",
            hint=f"no --config and no ./config.toml: running on the built-in defaults with state in {cfg.state_dir}",
        )
    try:
        return Daemon(cfg, config_path=args.config_path).run()
    except (StartupError, WalletError, EngineError, OSError) as e:
        log.error("startup_failed", error=str(e))
        return 1


def _status(args: argparse.Namespace, cfg: Config) -> int:
    from svd.control import call
    from svd.status import render_table

    try:
        snapshot = call(cfg.socket_path, "status")
    except (OSError, RuntimeError) as e:
        where = str(args.config_path) if args.config_path else "the built-in defaults"
        if args.json:
            print(json.dumps({"running": False, "socket": str(cfg.socket_path), "config": where, "error": str(e)}))
        else:
            print(
                f"svd is not running for the state dir {cfg.state_dir} (config: {where}; nothing answers on "
                f"{cfg.socket_path}: {e}).\nStart it with `svd run` (or `systemctl start svd`), or point --config "
                "at the config the daemon runs with.",
                file=sys.stderr,
            )
        return 1
    print(json.dumps(snapshot, indent=2) if args.json else render_table(snapshot))
    return 0


def _reload(args: argparse.Namespace, cfg: Config) -> int:
    done = _ask(cfg, "reload")
    if done is None:
        return 1
    applied, restart = done["applied"], done["restart_needed"]
    print(f"reloaded {done['path']}: " + (f"applied {', '.join(applied)}" if applied else "no live key changed"))
    if restart:
        print(f"not applied, needs a restart (systemctl restart svd): {', '.join(restart)}")
    return 0


def _swap(args: argparse.Namespace, cfg: Config) -> int:
    return _engine_command(cfg, "swap", name=args.name)


def _rollback(args: argparse.Namespace, cfg: Config) -> int:
    return _engine_command(cfg, "rollback")


def _unpin(args: argparse.Namespace, cfg: Config) -> int:
    return _engine_command(cfg, "unpin")


def _ask(cfg: Config, cmd: str, timeout: float = 5.0, **request: str) -> Any:
    """The daemon's answer to a control command; None (and one line on stderr) when it refuses or is not there."""
    from svd.control import call

    try:
        return call(cfg.socket_path, cmd, timeout=timeout, **request)
    except RuntimeError as e:
        print(f"svd: {cmd} refused: {e}", file=sys.stderr)
    except OSError as e:
        print(f"svd: no daemon answers on {cfg.socket_path}: {e}", file=sys.stderr)
    return None


def _engine_command(cfg: Config, cmd: str, **request: str) -> int:
    # Loading, warming up and checking an engine can take a while on a big backbone.
    engine = _ask(cfg, cmd, SWAP_TIMEOUT_S, **request)
    if engine is None:
        return 1
    print(f"serving {engine['name']} v{engine['version']}{' (pinned)' if engine['pinned'] else ''}")
    return 0


def _build_engine(args: argparse.Namespace, cfg: Config) -> int:
    modes = [m for m, given in (("--demo", args.demo), ("--classifier", args.classifier), ("--backbone", args.backbone))
             if given]  # fmt: skip
    if len(modes) != 1:
        print(
            "svd: build-engine needs one of --demo, --classifier REPO, or --backbone ID ... [--head CKPT]",
            file=sys.stderr,
        )
        return 2
    if args.head and not args.backbone:
        print("svd: --head goes with --backbone ID ...", file=sys.stderr)
        return 2
    if not args.demo and not args.name:
        print(f"svd: build-engine {modes[0]} needs --name NAME", file=sys.stderr)
        return 2
    if args.ensemble and not args.demo:
        print("svd: --ensemble is for --demo; pass one --backbone per member instead", file=sys.stderr)
        return 2
    if not 0.0 <= args.threshold <= 1.0:
        print(f"svd: --threshold must be within [0, 1], got {args.threshold}", file=sys.stderr)
        return 2
    from svd.engine.preprocess import Preprocess

    try:
        preprocess = Preprocess(args.mapping, args.resample)
    except ValueError as e:
        print(f"svd: --mapping/--resample: {e}", file=sys.stderr)
        return 2
    try:
        from svd.engine.build import build_demo_engine, build_engine
        from svd.engine.classifier import import_classifier
        from svd.engine.manifest import EngineError
    except ImportError as e:  # torch export tooling is the `build` extra
        print(f"svd: build-engine needs the build extra (pip install 'svd[build]'): {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.daemon.log_level, cfg.daemon.log_format)
    try:
        if args.demo:
            path = build_demo_engine(
                cfg.engines_dir,
                name=args.name or "demo",
                ensemble=args.ensemble,
                flip_tta=args.flip_tta,
                threshold=args.threshold,
                version=args.version,
                preprocess=preprocess,
            )
        elif args.classifier:  # its image processor's mapping, not --mapping
            path = import_classifier(
                args.classifier,
                cfg.engines_dir,
                args.name,
                positive_label=args.positive_label,
                version=args.version,
                plan_max_batch=cfg.batcher.max_batch,
            )
        else:
            path = build_engine(
                args.head,
                args.backbone,
                cfg.engines_dir,
                args.name,
                version=args.version,
                flip_tta=args.flip_tta,
                threshold=args.threshold,
                # Flip TTA sends 2N images through the backbone in one call.
                plan_max_batch=cfg.batcher.max_batch * (2 if args.flip_tta else 1),
                preprocess=preprocess,
            )
    except EngineError as e:
        print(f"svd: build-engine failed: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0
