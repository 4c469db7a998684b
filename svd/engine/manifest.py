"""Engine directory format: `engines/<name>/manifest.json` plus hashed parts.

An engine directory is immutable once renamed into `engines/`. Writers build
it in a dot-named temporary directory beside the target and rename it into
place, so the watcher never sees half an engine. See docs/engine-format.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from svd.engine.preprocess import LEGACY, Preprocess

log = structlog.get_logger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BACKBONE_ONNX = "backbone.onnx"
# Weights of a graph over protobuf's 2 GB limit (e.g. ViT-L + SigLIP2 so400m), beside it.
BACKBONE_ONNX_DATA = "backbone.onnx.data"
BACKBONE_PLAN = "backbone.plan"  # TensorRT plan of backbone.onnx (svd.plan), GPU boxes only
BACKBONE_WEIGHTS = "backbone.safetensors"  # torch reference backend
BACKBONE_CONFIG = "backbone_config.json"  # torch reference backend
HEAD = "head.safetensors"
# The backbone graph's tensors (ONNX export, ONNX Runtime, TensorRT plans): uint8 images in, float32 features out.
INPUT_NAME = "images"
OUTPUT_NAME = "features"
REQUIRED_PARTS = (BACKBONE_ONNX, HEAD)
TEMP_PREFIX = "."
_HASH_CHUNK = 1 << 20


class EngineError(Exception):
    """An engine directory, or loading it, is not usable; the message says why."""


@dataclass(frozen=True)
class InputSpec:
    height: int = 224
    width: int = 224
    channels: int = 3
    dtype: str = "uint8"
    layout: str = "NHWC"


SERVED_INPUT = InputSpec()
# Backbone families (svd.model.FAMILIES; repeated here so serving needs no torch).
FAMILIES = ("dinov3", "siglip2", "vit")


@dataclass(frozen=True)
class Member:
    """One backbone of the engine's graph; its features are the next `feature_dim` columns."""

    backbone_id: str
    family: str
    feature_dim: int


@dataclass(frozen=True, slots=True)
class EngineIdentity:
    """Which engine answered: what a kept sample records, and what tells training which backbone made its features."""

    name: str
    version: str
    backbone_sha256: str


@dataclass(frozen=True)
class Manifest:
    """What manifest.json holds. `parts` maps file name -> sha256 hex digest.

    Args:
        name: engine name, normally the directory name.
        version: free-form engine version (training run date, semver, ...).
        created: creation time, timezone-aware; newest_engine() orders by it.
        backbone_ids: hub ids (or "random:<...>" for demos) of the backbone(s).
        input: the image tensor the backbone graph takes.
        feature_dim: D of the backbone's (N, D) float32 features.
        flip_tta: average the probability of each image and its mirror.
        threshold: decision threshold on the calibrated probability.
        train_run_id: training run that produced the head, if any.
        holdout_metrics: validator metrics on the fixed holdout.
        parity: ONNX Runtime vs torch FP32 figures measured at build time.
        export: how the backbone graph was made (exporter, opset, versions).
        plan: TensorRT plan facts (gpu arch, TensorRT version, precision), if any.
        parts: file name -> sha256 of every part in the directory.
        members: the backbones in graph (and feature) order. Left empty, one
            member is derived from a single backbone id (engines built before
            ensembles have no such field; all of them were DINOv3).
        preprocess: how an encoded image becomes `input` (svd.engine.preprocess),
            for serving and training alike; engines written before the field
            existed get LEGACY, what they were always fed.
        head_trained: False for an engine built without a head (its head
            answers 0.5 to everything): never served while a trained engine
            exists, and the first training run gives it a head.
    """

    name: str
    version: str
    created: datetime
    backbone_ids: tuple[str, ...]
    input: InputSpec
    feature_dim: int
    flip_tta: bool = False
    threshold: float = 0.5
    train_run_id: str | None = None
    holdout_metrics: dict[str, float] = field(default_factory=dict)
    parity: dict[str, float] = field(default_factory=dict)
    export: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] | None = None
    parts: dict[str, str] = field(default_factory=dict)
    members: tuple[Member, ...] = ()
    preprocess: Preprocess = LEGACY
    head_trained: bool = True
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if not self.members and len(self.backbone_ids) == 1:
            ident = self.backbone_ids[0]
            family = "siglip2" if "siglip" in ident.lower() else "dinov3"
            object.__setattr__(self, "members", (Member(ident, family, self.feature_dim),))

    def to_json(self) -> str:
        data = asdict(self)
        data["created"] = self.created.isoformat()
        data["backbone_ids"] = list(self.backbone_ids)
        data["members"] = [asdict(m) for m in self.members]
        data["preprocess"] = asdict(self.preprocess)
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = MANIFEST_NAME) -> Manifest:
        """Parses and type-checks manifest JSON; raises EngineError naming `source`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EngineError(f"{source}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise EngineError(f"{source}: top level must be an object")
        return _manifest_from_dict(data, source)

    @property
    def identity(self) -> EngineIdentity:
        return EngineIdentity(self.name, self.version, self.backbone_sha256)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(m.feature_dim for m in self.members)

    @property
    def backbone_sha256(self) -> str:
        """Identity of the backbone: equal hashes mean the loaded one can be reused.

        The hash of backbone.onnx; for a graph with external weights, the hash
        of both parts' hashes (the .onnx alone holds no weights then).
        """
        onnx = self.parts.get(BACKBONE_ONNX, "")
        data = self.parts.get(BACKBONE_ONNX_DATA)
        return hashlib.sha256(f"{onnx}:{data}".encode()).hexdigest() if onnx and data else onnx


# Expected JSON types per field; bool is checked before int because bool is an int.
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "format_version": (int,),
    "name": (str,),
    "version": (str,),
    "created": (str,),
    "feature_dim": (int,),
    "flip_tta": (bool,),
    "threshold": (float, int),
    "train_run_id": (str, type(None)),
    "holdout_metrics": (dict,),
    "parity": (dict,),
    "export": (dict,),
    "plan": (dict, type(None)),
    "parts": (dict,),
    "backbone_ids": (list,),
    "input": (dict,),
    "members": (list,),
    "preprocess": (dict,),
    "head_trained": (bool,),
}
_REQUIRED = ("format_version", "name", "version", "created", "backbone_ids", "input", "feature_dim", "parts")


def _check_type(source: str, key: str, value: Any, types: tuple[type, ...]) -> None:
    is_bool = isinstance(value, bool)
    if (is_bool and bool not in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise EngineError(f"{source}: field {key!r} must be {wanted}, got {type(value).__name__}")


def _manifest_from_dict(data: dict[str, Any], source: str) -> Manifest:
    for key in _REQUIRED:
        if key not in data:
            raise EngineError(f"{source}: missing field {key!r}")
    for key, types in _SCALAR_TYPES.items():
        if key in data:
            _check_type(source, key, data[key], types)
    if data["format_version"] != FORMAT_VERSION:
        raise EngineError(
            f"{source}: format_version {data['format_version']!r} is not supported (want {FORMAT_VERSION})"
        )
    known = {f.name for f in fields(Manifest)}
    unknown = sorted(set(data) - known)
    if unknown:
        log.warning("manifest_unknown_fields", source=source, fields=unknown)
    if not all(isinstance(i, str) for i in data["backbone_ids"]):
        raise EngineError(f"{source}: field 'backbone_ids' must be a list of strings")
    for key in ("holdout_metrics", "parity"):
        if not all(_is_number(v) for v in data.get(key, {}).values()):
            raise EngineError(f"{source}: field {key!r} must map names to numbers")
    if data["feature_dim"] <= 0:
        raise EngineError(f"{source}: field 'feature_dim' must be positive")
    values = {k: v for k, v in data.items() if k in known}
    values["created"] = _parse_created(source, data["created"])
    values["backbone_ids"] = tuple(data["backbone_ids"])
    values["input"] = _input_from_dict(source, data["input"])
    values["parts"] = check_part_names(source, data["parts"])
    values["members"] = _members_from_list(source, data.get("members", []))
    values["threshold"] = float(data.get("threshold", 0.5))
    values["preprocess"] = _preprocess_from_dict(source, data.get("preprocess"))
    manifest = Manifest(**values)
    _check_members(source, manifest)
    return manifest


def _members_from_list(source: str, items: list[Any]) -> tuple[Member, ...]:
    types = {"backbone_id": str, "family": str, "feature_dim": int}
    members = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise EngineError(f"{source}: members[{i}] must be an object")
        for key, typ in types.items():
            if key not in item:
                raise EngineError(f"{source}: field 'members[{i}].{key}' is missing")
            _check_type(source, f"members[{i}].{key}", item[key], (typ,))
        members.append(Member(**{k: item[k] for k in types}))
    return tuple(members)


def _preprocess_from_dict(source: str, data: dict[str, Any] | None) -> Preprocess:
    if data is None:
        return LEGACY
    types = {"mapping": str, "resample": str, "draft": bool}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise EngineError(f"{source}: field 'preprocess' has unknown keys {unknown}")
    for key, typ in types.items():
        if key in data:
            _check_type(source, f"preprocess.{key}", data[key], (typ,))
    try:
        return Preprocess(**data)
    except ValueError as exc:
        raise EngineError(f"{source}: field 'preprocess': {exc}") from exc


def _check_members(source: str, manifest: Manifest) -> None:
    """Members must name the backbone ids in order and split feature_dim between them."""
    members = manifest.members
    if not members:
        raise EngineError(
            f"{source}: field 'members' is needed when there are {len(manifest.backbone_ids)} backbone ids"
        )
    if tuple(m.backbone_id for m in members) != manifest.backbone_ids:
        raise EngineError(f"{source}: members' backbone ids do not match 'backbone_ids' {list(manifest.backbone_ids)}")
    for i, m in enumerate(members):
        if m.family not in FAMILIES:
            raise EngineError(f"{source}: members[{i}].family {m.family!r} is not one of {', '.join(FAMILIES)}")
        if m.feature_dim <= 0:
            raise EngineError(f"{source}: members[{i}].feature_dim must be positive")
    total = sum(m.feature_dim for m in members)
    if total != manifest.feature_dim:
        raise EngineError(f"{source}: members' feature dims sum to {total}, 'feature_dim' is {manifest.feature_dim}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_created(source: str, text: str) -> datetime:
    try:
        created = datetime.fromisoformat(text)
    except ValueError as exc:
        raise EngineError(f"{source}: field 'created' is not an ISO 8601 time: {text!r}") from exc
    # Naive times would make newest_engine() compare apples with oranges.
    if created.tzinfo is None:
        raise EngineError(f"{source}: field 'created' needs a timezone: {text!r}")
    return created


def _input_from_dict(source: str, data: dict[str, Any]) -> InputSpec:
    types = {"height": int, "width": int, "channels": int, "dtype": str, "layout": str}
    for key, typ in types.items():
        if key not in data:
            raise EngineError(f"{source}: field 'input.{key}' is missing")
        _check_type(source, f"input.{key}", data[key], (typ,))
    return InputSpec(**{k: data[k] for k in types})


def check_part_names(source: str, data: dict[str, Any]) -> dict[str, str]:
    for name, digest in data.items():
        # Parts live directly in the engine directory: no paths, no escapes.
        if not name or "/" in name or "\\" in name or name.startswith(".") or name == MANIFEST_NAME:
            raise EngineError(f"{source}: part name {name!r} is not a plain file name")
        if not isinstance(digest, str) or len(digest) != 64:
            raise EngineError(f"{source}: part {name!r} must have a sha256 hex digest")
    return dict(data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(engine_dir: Path) -> Manifest:
    """Reads and type-checks `engine_dir/manifest.json` (no part checks)."""
    path = engine_dir / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EngineError(f"{path}: cannot read manifest ({exc})") from exc
    return Manifest.from_json(text, source=str(path))


def verify_engine_dir(engine_dir: Path) -> Manifest:
    """Checks manifest, input spec and every part's sha256; returns the manifest.

    Raises:
        EngineError: naming the file and what is wrong with it.
    """
    manifest = read_manifest(engine_dir)
    source = str(engine_dir / MANIFEST_NAME)
    if manifest.input != SERVED_INPUT:
        raise EngineError(f"{source}: input spec {asdict(manifest.input)} is not the served {asdict(SERVED_INPUT)}")
    for name in REQUIRED_PARTS:
        if name not in manifest.parts:
            raise EngineError(f"{source}: required part {name!r} is not listed in parts")
    for name, expected in manifest.parts.items():
        path = engine_dir / name
        if not path.is_file():
            raise EngineError(f"{path}: part listed in the manifest is missing")
        actual = sha256_file(path)
        if actual != expected.lower():
            raise EngineError(f"{path}: sha256 mismatch (manifest {expected[:12]}…, file {actual[:12]}…)")
    return manifest


def serving_rank(manifest: Manifest, name: str) -> tuple[bool, datetime, str]:
    """Which engine serves first: a trained head before an untrained one, then the newest, then by name."""
    return manifest.head_trained, manifest.created, name


def utc_now() -> datetime:
    return datetime.now(UTC)
