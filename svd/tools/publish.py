"""`svd publish`: the serving engine's head and manifest, with a model_card.json, on Hugging Face.

The subnet asks each miner for a public Hugging Face model repo holding a
`model_card.json` at its root (model_name, description, version X.Y.Z,
submitted_by = the hotkey's ss58, submission_time in unix seconds); NATIX's
application server reads it for the repo given at `svd register`. Only the
head and the manifest go up by default: the manifest names the backbone by its
public hub id, so the backbone graph (gigabytes) is optional.

huggingface_hub is imported only when something is uploaded, so `--dry-run`
works without it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import re
import shutil
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from svd.config import Config
from svd.engine.manifest import (
    BACKBONE_ONNX,
    BACKBONE_ONNX_DATA,
    HEAD,
    MANIFEST_NAME,
    EngineError,
    Manifest,
    read_manifest,
    sha256_file,
)

if TYPE_CHECKING:
    from bittensor_wallet import Keypair

log = structlog.get_logger(__name__)

MODEL_CARD = "model_card.json"
# Hub repo ids: "user/repo"; names are letters, digits, '-', '_' and '.'.
REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
VERSION_RE = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)$")


class PublishError(Exception):
    """The engine, the card or the upload is not right; the message says what and what to do."""


@dataclass(frozen=True)
class ModelCard:
    """model_card.json, in the field order of the subnet's docs/Mining.md."""

    model_name: str
    description: str
    version: str
    submitted_by: str
    submission_time: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def parse_repo_id(text: str) -> str:
    """Checks a Hugging Face model repo id ("user/repo") and returns it.

    Args:
        text: the repo id as the operator typed it.

    Raises:
        PublishError: for anything but "user/repo" (a hub URL included).
    """
    if not REPO_ID_RE.fullmatch(text) or ".." in text or text.endswith((".git", ".")):
        raise PublishError(f"expected a Hugging Face repo id like user/repo, got {text!r}")
    return text


def make_model_card(
    manifest: Manifest,
    repo_id: str,
    submitted_by: str,
    *,
    model_name: str | None = None,
    description: str | None = None,
    version: str | None = None,
    now: float | None = None,
) -> ModelCard:
    """The card for `manifest`'s engine published in `repo_id` by hotkey `submitted_by`.

    Args:
        manifest: the engine's manifest.
        repo_id: "user/repo"; with the engine name and version it makes the
            default model_name, unique across miners because the repo is.
        submitted_by: the miner hotkey's ss58 address.
        model_name: overrides the derived name.
        description: overrides the derived description.
        version: X.Y.Z; defaults to the manifest's version when it has that form.
        now: unix time of the submission (default: the current time).

    Raises:
        PublishError: if no X.Y.Z version is given or derivable, or a name is empty.
    """
    version = version if version is not None else manifest.version
    if not VERSION_RE.fullmatch(version):
        source = "--version" if version != manifest.version else f"engine {manifest.name}'s manifest version"
        raise PublishError(f"{source} {version!r} is not X.Y.Z (e.g. 1.2.0): pass --version X.Y.Z")
    name = model_name if model_name is not None else f"{repo_id.replace('/', '-')}-{manifest.name}-{version}"
    if not name.strip():
        raise PublishError("--model-name must not be empty")
    if description is None:
        description = (
            f"svd engine {manifest.name} v{manifest.version}: a trained head on "
            f"{', '.join(manifest.backbone_ids)} features (head.safetensors; manifest.json lists every part's sha256)"
        )
    return ModelCard(name, description, version, submitted_by, int(now if now is not None else time.time()))


def engine_files(engine_dir: Path, include_backbone: bool = False) -> tuple[Manifest, dict[str, Path]]:
    """The engine's files to publish (repo path -> local file), checked against the manifest's hashes.

    Args:
        engine_dir: an engine directory (manifest.json plus parts).
        include_backbone: add backbone.onnx (and backbone.onnx.data when the engine has it).

    Raises:
        PublishError: if the manifest is unreadable, or a part is missing or changed.
    """
    try:
        manifest = read_manifest(engine_dir)
    except EngineError as e:
        raise PublishError(str(e)) from e
    parts = [HEAD]
    if include_backbone:
        parts += [p for p in (BACKBONE_ONNX, BACKBONE_ONNX_DATA) if p in manifest.parts]
    files = {MANIFEST_NAME: engine_dir / MANIFEST_NAME}
    for name in parts:
        path = engine_dir / name
        expected = manifest.parts.get(name)
        if expected is None or not path.is_file():
            raise PublishError(f"{path}: part missing from engine {manifest.name}")
        if sha256_file(path) != expected.lower():
            raise PublishError(f"{path}: sha256 differs from the manifest's; the engine was changed after writing")
        files[name] = path
    return manifest, files


def write_folder(dest: Path, files: Mapping[str, Path], card: ModelCard) -> list[Path]:
    """Writes exactly what `upload` would send into `dest` (new or empty); returns the paths written.

    Args:
        dest: the folder to fill.
        files: repo path -> local file, as from engine_files().
        card: written as model_card.json.

    Raises:
        PublishError: if `dest` holds anything already, or cannot be written.
    """
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise PublishError(f"{dest}: exists and is not an empty directory")
    written = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        for name, source in files.items():
            shutil.copyfile(source, dest / name)
            written.append(dest / name)
        (dest / MODEL_CARD).write_text(card.to_json())
    except OSError as e:
        raise PublishError(f"cannot write {dest}: {e}") from e
    return [*written, dest / MODEL_CARD]


def upload(
    repo_id: str,
    files: Mapping[str, Path],
    card: ModelCard,
    token: str,
    endpoint: str | None = None,
    commit_message: str = "svd publish",
) -> str:
    """Creates `repo_id` if needed (public) and commits `files` plus model_card.json at its root.

    Args:
        repo_id: "user/repo".
        files: repo path -> local file, as from engine_files().
        card: uploaded as model_card.json.
        token: a Hugging Face token with write access; never logged.
        endpoint: the hub (default: huggingface_hub's, i.e. HF_ENDPOINT or https://huggingface.co).
        commit_message: the commit's summary line.

    Returns:
        The repo's URL.

    Raises:
        PublishError: if huggingface_hub is missing, or the hub refuses or cannot be reached.
    """
    try:
        from huggingface_hub import CommitOperationAdd, HfApi
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError as e:
        raise PublishError(f"publishing needs huggingface_hub (pip install huggingface_hub): {e}") from e
    api = HfApi(endpoint=endpoint, token=token)
    operations = [CommitOperationAdd(name, str(path)) for name, path in files.items()]
    operations.append(CommitOperationAdd(MODEL_CARD, card.to_json().encode()))
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.create_commit(repo_id, operations, commit_message=commit_message)
    except HfHubHTTPError as e:
        reason = e.server_message or _first_line(e)
        status = e.response.status_code
        raise PublishError(f"{api.endpoint} refused the upload to {repo_id} (HTTP {status}): {reason}") from e
    except _transport_errors() as e:
        raise PublishError(f"cannot reach {api.endpoint}: {e}") from e
    log.debug("model_published", repo=repo_id, commit=commit.oid, files=sorted([*files, MODEL_CARD]))
    return f"{api.endpoint}/{repo_id}"


def find_serving_engine(cfg: Config, name: str | None = None) -> tuple[Path, str]:
    """The engine to publish and a line saying where it came from.

    Args:
        cfg: the configuration (engines_dir, socket_path).
        name: an engine directory name in engines_dir; None asks the running
            daemon which engine it serves, else takes the newest one on disk.

    Raises:
        PublishError: if the named engine does not exist or there is none at all.
    """
    if name is not None:
        path = cfg.engines_dir / name
        if not (path / MANIFEST_NAME).is_file():
            raise PublishError(f"no engine {name!r} in {cfg.engines_dir}")
        return path, f"engine {name} (--engine)"
    from svd.control import call

    try:
        served = call(cfg.socket_path, "status")["engine"]["path"]
        return Path(served), f"engine {Path(served).name}, served by the running daemon"
    except (OSError, RuntimeError, ValueError, KeyError, TypeError) as e:
        reason = f"no daemon answers on {cfg.socket_path} ({e})"
    from svd.engine.load import newest_engine  # imports the runtime; only needed here

    newest = newest_engine(cfg.engines_dir)
    if newest is None:
        raise PublishError(f"{reason}, and {cfg.engines_dir} holds no engine: pass --engine NAME")
    return newest, f"{reason}: using the newest engine on disk, {newest.name}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`svd publish` flags; sets run_publish as the command."""
    parser.add_argument("repo", help="Hugging Face model repo, user/repo (created public if missing)")
    parser.add_argument("--engine", metavar="NAME", help="engine in engines/ (default: the one the daemon serves)")
    parser.add_argument("--model-name", help="model_card.json model_name (default: <user>-<repo>-<engine>-<version>)")
    parser.add_argument("--description", help="model_card.json description")
    parser.add_argument("--version", help="X.Y.Z (default: the engine manifest's version when it is X.Y.Z)")
    parser.add_argument(
        "--include-backbone", action="store_true", help="upload backbone.onnx too (default: head and manifest)"
    )
    parser.add_argument("--dry-run", metavar="DIR", type=Path, help="write the folder it would upload; send nothing")
    parser.add_argument("--endpoint", metavar="URL", help="hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.set_defaults(func=run_publish)


def run_publish(args: argparse.Namespace, cfg: Config) -> int:
    """`svd publish`: 0 published (or dry run written), 1 failed, 2 bad arguments.

    Args:
        args: parsed by a parser that add_arguments() filled.
        cfg: the configuration (wallet, auth.mode and state_dir: the daemon's hotkey; engines_dir, socket_path).
    """
    try:
        repo_id = parse_repo_id(args.repo)
    except PublishError as e:
        print(f"svd: {e}", file=sys.stderr)
        return 2
    try:
        engine_dir, where = find_serving_engine(cfg, args.engine)
        print(where)
        manifest, files = engine_files(engine_dir, args.include_backbone)
        hotkey = _hotkey(cfg)
        card = make_model_card(
            manifest,
            repo_id,
            hotkey.ss58_address,
            model_name=args.model_name,
            description=args.description,
            version=args.version,
        )
        if args.dry_run is not None:
            return _dry_run(args.dry_run, files, card)
        url = upload(repo_id, files, card, _token(), args.endpoint, f"svd publish {manifest.name} v{card.version}")
    except PublishError as e:
        print(f"svd: publish failed: {e}", file=sys.stderr)
        return 1
    print(f"published {', '.join([*files, MODEL_CARD])} to {url}")
    print(f'set server.model_url = "{url}" in the config, then run `svd register {repo_id}`')
    return 0


def _dry_run(dest: Path, files: Mapping[str, Path], card: ModelCard) -> int:
    for path in write_folder(dest, files, card):
        print(f"  {path}")
    print(card.to_json(), end="")
    print(f"dry run: wrote {dest}; nothing was sent")
    return 0


def serving_hotkey(cfg: Config) -> tuple[Keypair, str]:
    """The hotkey `svd run` serves with under `cfg`, and a line naming it and its file.

    The daemon's own call (svd/daemon.py), so the same config gives the same
    key: the [wallet] hotkey, or offline, when that file does not exist, the
    one generated under state/wallets/ (made now if `svd run` has not yet).

    Raises:
        svd.serve.wallet.WalletError: the hotkey cannot be loaded (the message names the file).
    """
    from svd.serve.wallet import OFFLINE_WALLET, hotkey_wallets, load_hotkey

    offline = cfg.auth.mode == "offline"
    keypair = load_hotkey(cfg.wallet, cfg.state_dir, offline=offline)
    named, generated = (w.hotkey_file for w in hotkey_wallets(cfg.wallet, cfg.state_dir))
    if named.exists_on_device():
        return keypair, f"hotkey {keypair.ss58_address} ({named.path}, the one svd run serves with)"
    return keypair, (
        f"hotkey {keypair.ss58_address} ({generated.path}, the {OFFLINE_WALLET} key svd makes for offline mode, "
        "the one svd run serves with; no chain knows it: to mine, set [wallet] to your registered hotkey and "
        '[auth] mode = "online")'
    )


def _hotkey(cfg: Config) -> Keypair:
    from svd.serve.wallet import WalletError

    try:
        keypair, line = serving_hotkey(cfg)
    except WalletError as e:
        raise PublishError(str(e)) from e
    print(line)
    return keypair


def _token() -> str:
    try:
        from huggingface_hub import get_token
    except ImportError as e:
        raise PublishError(f"publishing needs huggingface_hub (pip install huggingface_hub): {e}") from e
    token = get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return token


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub 1.x sends with httpx, 2.x with httpx2; both raise their own HTTPError.
    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            errors.append(importlib.import_module(name).HTTPError)
    return tuple(errors)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
