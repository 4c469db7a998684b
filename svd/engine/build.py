"""Writes engine directories: from backbones (export, parity, plan) or as a new head on an engine's backbone.

One graph per engine: an ensemble's members run inside it and their features
are concatenated (manifest member order). After the ONNX parity gate a
TensorRT plan is built where `svd.engine.plan` says it can be (a GPU box).
write_head_engine() is what training writes: the serving engine's backbone
parts, shared as they are, under a new head.
"""

from __future__ import annotations

import importlib
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
from safetensors.torch import load_file, save
from torch import nn

from svd.engine.backends.torch import backbone_config_json
from svd.engine.export import DEFAULT_OPSET, export_backbone_onnx
from svd.engine.head import Head, numpy_to_tensor, random_head, untrained_head
from svd.engine.manifest import (
    BACKBONE_CONFIG,
    BACKBONE_ONNX,
    BACKBONE_ONNX_DATA,
    BACKBONE_PLAN,
    BACKBONE_WEIGHTS,
    HEAD,
    SERVED_INPUT,
    EngineError,
    Manifest,
    Member,
    read_manifest,
    utc_now,
)
from svd.engine.model import (
    DINOV3,
    SIGLIP2,
    EnsembleBackbone,
    load_member,
    member_from_config,
    tiny_dinov3_config,
    tiny_siglip2_config,
)
from svd.engine.parity import check_onnx_parity, gate_parity
from svd.engine.preprocess import DEFAULT as DEFAULT_PREPROCESS
from svd.engine.preprocess import Preprocess
from svd.engine.writer import SharedPart, write_engine_dir

# transformers is the `build` extra: writing a head-only engine (training) must not need it.
if TYPE_CHECKING:
    from transformers import DINOv3ViTConfig, SiglipVisionConfig

log = structlog.get_logger(__name__)

# Largest batch the TensorRT profile covers unless the caller says (flip TTA doubles a batch).
PLAN_MAX_BATCH = 32


def _as_ensemble(backbone: nn.Module) -> EnsembleBackbone:
    return backbone if isinstance(backbone, EnsembleBackbone) else EnsembleBackbone([backbone])  # type: ignore[list-item]


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)


def _reference(backbone: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> torch FP32 features, what a TensorRT plan is checked against."""

    def features(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = backbone(numpy_to_tensor(images)).float().numpy()
        return out

    return features


def _maybe_build_plan(
    onnx_path: Path, backbone: EnsembleBackbone, max_batch: int
) -> tuple[Path, dict[str, Any]] | None:
    """The TensorRT plan next to the ONNX file, if `svd.plan` is present and supported here.

    A plan is an optional speed-up: when no precision passes its parity gate
    the engine ships without one (ONNX Runtime serves it) and a WARNING
    `plan_skipped` says why.
    """
    try:
        plan = importlib.import_module("svd.engine.plan")
    except ImportError as exc:
        log.info("plan_skipped", reason=f"svd.engine.plan not importable ({exc})")
        return None
    if not plan.plan_supported():
        log.info("plan_skipped", reason="plan_supported() is false (no CUDA or TensorRT)")
        return None
    plan_path = onnx_path.with_name(BACKBONE_PLAN)
    try:
        facts: dict[str, Any] = plan.build_plan(
            onnx_path,
            plan_path,
            _reference(backbone),
            max_batch=max_batch,
            member_dims=list(backbone.feature_dims),
        )
    except EngineError as exc:
        log.warning("plan_skipped", reason=str(exc))
        return None
    log.info("plan_built", path=str(plan_path), **{k: v for k, v in facts.items() if isinstance(v, (str, int, float))})
    return plan_path, facts


def assemble_engine(
    target: Path,
    backbone: nn.Module,
    head: Head,
    manifest: Manifest,
    *,
    opset: int = DEFAULT_OPSET,
    torch_parts: bool = True,
    poison_head: bool = False,
    plan_max_batch: int = PLAN_MAX_BATCH,
    external_data: bool | None = None,
) -> Path:
    """Exports, parity-checks and writes one engine directory at `target`.

    Args:
        target: the engine directory to create (must not exist).
        backbone: an EnsembleBackbone (or one member backbone); its torch FP32
            output is the reference.
        head: the trained (or random) head; one member MLP per backbone member.
        manifest: everything but parity, export, plan and parts, which are filled here.
        opset: ONNX opset for the export.
        torch_parts: also write backbone.safetensors + backbone_config.json so
            the torch reference backend can serve this engine.
        poison_head: test hook; fill the head's last layer with NaN after the
            parity gate so the engine loads normally but yields NaN.
        plan_max_batch: largest batch of a TensorRT plan's profile.
        external_data: see export_backbone_onnx(); None decides by size.
    """
    if target.exists():
        raise EngineError(f"{target}: engine directory already exists; engines are immutable")
    ensemble = _as_ensemble(backbone)
    if head.feature_dims != ensemble.feature_dims or manifest.feature_dims != ensemble.feature_dims:
        raise EngineError(
            f"{target.name}: head takes features {list(head.feature_dims)}, manifest says "
            f"{list(manifest.feature_dims)}, backbones give {list(ensemble.feature_dims)}"
        )
    with tempfile.TemporaryDirectory(prefix="svd-build-") as work:
        onnx_path = Path(work) / BACKBONE_ONNX
        export_backbone_onnx(ensemble, onnx_path, opset, external_data)
        parity = check_onnx_parity(ensemble, head, onnx_path)
        log.info("parity_checked", engine=manifest.name, **parity)
        gate_parity(parity)
        parts: dict[str, Path | bytes] = {BACKBONE_ONNX: onnx_path}
        if (data_path := onnx_path.with_name(BACKBONE_ONNX_DATA)).exists():
            parts[BACKBONE_ONNX_DATA] = data_path  # the graph names it by this relative path
        plan = _maybe_build_plan(onnx_path, ensemble, plan_max_batch)
        if plan is not None:
            parts[BACKBONE_PLAN] = plan[0]
        if poison_head:
            with torch.no_grad():
                head.members[0].fc2.weight.fill_(float("nan"))  # type: ignore[union-attr,operator]
        parts[HEAD] = _tensor_bytes(head.state_dict())
        if torch_parts:
            parts[BACKBONE_WEIGHTS] = _tensor_bytes(ensemble.state_dict())
            parts[BACKBONE_CONFIG] = backbone_config_json(ensemble)
        export = {
            "exporter": "torch.onnx.export(dynamo=True)",
            "opset": opset,
            "torch": torch.__version__,
            "transformers": _transformers_version(),
            "external_data": BACKBONE_ONNX_DATA in parts,
        }
        full = replace(manifest, parity=parity, export=export, plan=plan[1] if plan else None)
        write_engine_dir(target, full, parts)
    return target


def _members(ensemble: EnsembleBackbone, ids: Sequence[str]) -> tuple[Member, ...]:
    return tuple(Member(i, f, d) for i, f, d in zip(ids, ensemble.families, ensemble.feature_dims, strict=True))


def build_demo_engine(
    engines_dir: Path,
    name: str = "demo",
    *,
    seed: int = 0,
    config: DINOv3ViTConfig | None = None,
    head_hidden: int = 256,
    flip_tta: bool = False,
    threshold: float = 0.5,
    version: str = "0.1.0",
    opset: int = DEFAULT_OPSET,
    torch_parts: bool = True,
    head_nan: bool = False,
    ensemble: bool = False,
    siglip_config: SiglipVisionConfig | None = None,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
) -> Path:
    """Builds `engines_dir/<name>` from seeded random tiny backbone(s) and head; never downloads.

    Args:
        engines_dir: the engines folder; created if missing.
        name: engine directory name.
        seed: seeds the backbones (seed, seed + 2) and head (seed + 1) weights.
        config: DINOv3 config; default tiny_dinov3_config() (ViT-Ti-like).
        head_hidden: hidden width of each head MLP.
        flip_tta, threshold, version: recorded in the manifest.
        opset: ONNX opset for the export.
        torch_parts: include the torch reference backend's parts.
        head_nan: test hook, see assemble_engine(poison_head=...).
        ensemble: add a tiny SigLIP2 member after the DINOv3 one.
        siglip_config: its config; default tiny_siglip2_config().
        preprocess: how a query image becomes the input (recorded in the manifest).

    Raises:
        EngineError: parity failed or the target exists; nothing is written.
    """
    config = config or tiny_dinov3_config()
    members = [member_from_config(DINOV3, config, seed)]
    ids = [f"random:dinov3-vit-h{config.hidden_size}-l{config.num_hidden_layers}-seed{seed}"]
    if ensemble:
        siglip_config = siglip_config or tiny_siglip2_config()
        members.append(member_from_config(SIGLIP2, siglip_config, seed + 2))
        ids.append(f"random:siglip2-h{siglip_config.hidden_size}-l{siglip_config.num_hidden_layers}-seed{seed + 2}")
    backbone = EnsembleBackbone(members)
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_now(),
        backbone_ids=tuple(ids),
        input=SERVED_INPUT,
        feature_dim=backbone.feature_dim,
        flip_tta=flip_tta,
        threshold=threshold,
        members=_members(backbone, ids),
        preprocess=preprocess,
    )
    head = random_head(backbone.feature_dims, head_hidden, seed + 1)
    return assemble_engine(
        engines_dir / name, backbone, head, manifest, opset=opset, torch_parts=torch_parts, poison_head=head_nan
    )


def load_backbones(backbone_ids: Sequence[str]) -> EnsembleBackbone:
    """The ensemble of `backbone_ids` in order; hub ids via from_pretrained (see load_member).

    Raises:
        EngineError: an id is unknown, unsupported, or its weights cannot be had.
    """
    members = []
    for ident in backbone_ids:
        try:
            members.append(load_member(ident))
        except ValueError as exc:
            raise EngineError(str(exc)) from exc
        except OSError as exc:  # hub: not cached and not downloadable, or gated without a token
            first = (str(exc).strip().splitlines() or [repr(exc)])[0]
            raise EngineError(
                f"{ident}: cannot load the backbone from the Hugging Face cache or hub ({first}); "
                "gated repos (DINOv3) need access granted and a token (HF_TOKEN or `hf auth login`)"
            ) from exc
    return EnsembleBackbone(members)


def build_engine(
    head_checkpoint: Path | None,
    backbone_ids: Sequence[str] | str,
    engines_dir: Path,
    name: str,
    *,
    version: str,
    flip_tta: bool = False,
    threshold: float = 0.5,
    train_run_id: str | None = None,
    holdout_metrics: dict[str, float] | None = None,
    opset: int = DEFAULT_OPSET,
    torch_parts: bool = False,
    plan_max_batch: int = PLAN_MAX_BATCH,
    preprocess: Preprocess = DEFAULT_PREPROCESS,
) -> Path:
    """Builds an engine from backbone ids (hub ids, or random:<family>-tiny for tests) and a head.safetensors.

    The head checkpoint is the ensemble format (one member MLP per backbone,
    fusion, temperature) or, for one backbone, the older single-MLP format.
    Without one (None) the engine gets an untrained head (every answer 0.5)
    and `head_trained` false in its manifest: the first training run gives it
    a head. Real backbones come from the local Hugging Face cache, or the
    network and a token for gated DINOv3 repos. torch_parts defaults off: they
    double the disk use.

    Raises:
        EngineError: a backbone cannot be loaded, the head does not fit the
            backbones, parity fails, or the target exists.
    """
    ids = (backbone_ids,) if isinstance(backbone_ids, str) else tuple(backbone_ids)
    if not ids:
        raise EngineError("build_engine needs at least one backbone id")
    head = _checkpoint_head(head_checkpoint, len(ids)) if head_checkpoint is not None else None
    backbone = load_backbones(ids)
    if head is None:
        head = untrained_head(backbone.feature_dims)
    elif head.feature_dims != backbone.feature_dims:
        raise EngineError(
            f"{head_checkpoint}: head takes features {list(head.feature_dims)}, "
            f"backbones give {list(backbone.feature_dims)}"
        )
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_now(),
        backbone_ids=ids,
        input=SERVED_INPUT,
        feature_dim=backbone.feature_dim,
        flip_tta=flip_tta,
        threshold=threshold,
        train_run_id=train_run_id,
        holdout_metrics=dict(holdout_metrics or {}),
        members=_members(backbone, ids),
        preprocess=preprocess,
        head_trained=head_checkpoint is not None,
    )
    return assemble_engine(
        engines_dir / name,
        backbone,
        head,
        manifest,
        opset=opset,
        torch_parts=torch_parts,
        plan_max_batch=plan_max_batch,
    )


def _checkpoint_head(path: Path, members: int) -> Head:
    try:
        head = Head.from_state(load_file(str(path)))
    except Exception as exc:  # safetensors, KeyError, ValueError and load_state_dict errors alike
        raise EngineError(f"{path}: cannot load head weights ({exc!r})") from exc
    if len(head.feature_dims) != members:
        raise EngineError(f"{path}: head has {len(head.feature_dims)} members, {members} backbone ids given")
    return head


def write_head_engine(
    base: Path,
    target: Path,
    head: Head,
    *,
    version: str,
    train_run_id: str | None = None,
    holdout_metrics: Mapping[str, float] | None = None,
    created: datetime | None = None,
    preprocess: Preprocess | None = None,
    trained: bool = True,
) -> Manifest:
    """Writes engine `target`: a new head on `base`'s backbone; returns its manifest.

    Every part but the head is `base`'s own file (hard-linked where the file
    system allows, else copied), under the same hash, so a daemon serving
    `base` swaps to it by loading the head alone. Name (target's directory
    name), version, created time, run id and holdout metrics are new; the
    decision threshold is 0.5 (a trained head folds its decision bias into
    the logit, because validators round at 0.5). The mapping (preprocess) is
    `base`'s unless given: a head is served the way it was trained. Written
    atomically like any engine, so the watcher sees it whole or not at all.

    Raises:
        EngineError: `base` is not an engine, the head does not fit its members,
            a metric is not a finite number, or `target` exists.
    """
    manifest = read_manifest(base)
    if head.feature_dims != manifest.feature_dims:
        raise EngineError(
            f"{target.name}: head takes features {list(head.feature_dims)}, "
            f"{base.name}'s backbone gives {list(manifest.feature_dims)}"
        )
    metrics = {k: float(v) for k, v in (holdout_metrics or {}).items()}
    if not all(math.isfinite(v) for v in metrics.values()):
        raise EngineError(f"{target.name}: holdout metrics must be finite numbers, got {metrics}")
    parts: dict[str, Path | bytes | SharedPart] = {
        name: SharedPart(base / name, digest) for name, digest in manifest.parts.items() if name != HEAD
    }
    parts[HEAD] = _tensor_bytes(head.state_dict())
    new = replace(
        manifest,
        name=target.name,
        version=version,
        created=created or utc_now(),
        threshold=0.5,
        train_run_id=train_run_id,
        holdout_metrics=metrics,
        preprocess=preprocess or manifest.preprocess,
        head_trained=trained,
    )
    return write_engine_dir(target, new, parts)
