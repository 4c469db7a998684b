"""Builds engine directories: export the backbone(s) to ONNX, check parity, write atomically.

One graph per engine: an ensemble's members run inside it and their features
are concatenated (manifest member order). After the ONNX parity gate a
TensorRT plan is built where `svd.plan` says it can be (a GPU box).

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript).
For DINOv3 it gives a clean graph: the RoPE sin/cos tables fold to constants
and no `If` nodes remain, where the TorchScript exporter leaves ~3x more
nodes including data-dependent `If`s that TensorRT handles badly.
"""

from __future__ import annotations

import importlib
import logging
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
import transformers
from safetensors.torch import load_file, save
from torch import nn
from transformers import DINOv3ViTConfig, SiglipVisionConfig

from svd.engine.backends.onnx import INPUT_NAME, OUTPUT_NAME, make_session
from svd.engine.backends.torch import backbone_config_json
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
    utc_now,
    write_engine_dir,
)
from svd.engine.model import (
    DINOV3,
    SIGLIP2,
    EnsembleBackbone,
    Head,
    load_member,
    member_from_config,
    tiny_dinov3_config,
    tiny_siglip2_config,
)

log = structlog.get_logger(__name__)

DEFAULT_OPSET = 18
PARITY_MIN_COSINE = 0.999
PARITY_MAX_PROB_DIFF = 1e-3
PARITY_BATCH_SIZES = (1, 4)
MAX_EXPORT_BATCH = 1024
# Above this many bytes of weights the graph keeps them in backbone.onnx.data:
# one protobuf cannot exceed 2 GiB (ViT-L + SigLIP2 so400m is ~2.9 GB in FP32).
EXTERNAL_DATA_BYTES = 1_800_000_000
# Largest batch the TensorRT profile covers unless the caller says (flip TTA doubles a batch).
PLAN_MAX_BATCH = 32
# Loggers that chatter at WARNING during every export (e.g. "torchvision is not installed",
# "Skipping constant folding for op Split with multiple outputs").
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration", "onnxscript.optimizer._constant_folding")


@contextmanager
def _quiet_export() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        # torch.export itself trips FutureWarnings from torch internals; they are
        # not ours to fix and would fail a test run with filterwarnings=error.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def export_backbone_onnx(
    backbone: nn.Module, path: Path, opset: int = DEFAULT_OPSET, external_data: bool | None = None
) -> None:
    """Exports `backbone` to an ONNX graph with a dynamic batch dimension.

    Input "images" uint8 [batch, 224, 224, 3]; output "features" float32 [batch, D].
    external_data: weights in `<path>.data` beside the graph; None decides by
    size (over EXTERNAL_DATA_BYTES), else one self-contained file.
    """
    if external_data is None:
        external_data = weight_bytes(backbone) > EXTERNAL_DATA_BYTES
    shape = (2, SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)
    # Batch 2, not 1: torch.export specialises dimensions of size 1.
    sample = torch.zeros(shape, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    with _quiet_export():
        torch.onnx.export(
            backbone.eval(),
            (sample,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            dynamo=True,
            external_data=external_data,
            verbose=False,
        )
    data = path.with_name(path.name + ".data")
    log.info(
        "backbone_exported",
        path=str(path),
        opset=opset,
        bytes=path.stat().st_size,
        external_bytes=data.stat().st_size if data.exists() else 0,
    )


def _as_ensemble(backbone: nn.Module) -> EnsembleBackbone:
    return backbone if isinstance(backbone, EnsembleBackbone) else EnsembleBackbone([backbone])  # type: ignore[list-item]


def check_parity(
    backbone: nn.Module,
    head: Head,
    onnx_path: Path,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> dict[str, float]:
    """Compares ONNX Runtime features and probs with torch FP32 on random images.

    Cosine is taken per member slice (a big member must not hide a broken
    small one). Returns the worst figures over all batch sizes:
    feature_max_abs_diff, feature_cosine_min (over all members),
    prob_max_abs_diff, and per member k `member{k}_feature_cosine_min` and
    `member{k}_feature_max_abs_diff`.
    """
    dims = list(head.feature_dims)
    session = make_session(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    figures = {"feature_max_abs_diff": 0.0, "feature_cosine_min": 1.0, "prob_max_abs_diff": 0.0}
    for k in range(len(dims)):
        figures[f"member{k}_feature_cosine_min"] = 1.0
        figures[f"member{k}_feature_max_abs_diff"] = 0.0
    for n in batch_sizes:
        images = rng.integers(0, 256, (n, SERVED_INPUT.height, SERVED_INPUT.width, 3), dtype=np.uint8)
        (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        with torch.inference_mode():
            ref_t = backbone(torch.from_numpy(images))
            ours_t = torch.from_numpy(np.asarray(ours, dtype=np.float32))
            parts = zip(torch.split(ours_t, dims, dim=1), torch.split(ref_t, dims, dim=1), strict=True)
            for k, (a, b) in enumerate(parts):
                cosine = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
                diff = (a - b).abs().max().item()
                figures[f"member{k}_feature_cosine_min"] = _worst(figures[f"member{k}_feature_cosine_min"], cosine, min)
                figures[f"member{k}_feature_max_abs_diff"] = _worst(
                    figures[f"member{k}_feature_max_abs_diff"], diff, max
                )
            prob_diff = (head.probs(ours_t) - head.probs(ref_t)).abs().max().item()
        figures["prob_max_abs_diff"] = _worst(figures["prob_max_abs_diff"], prob_diff, max)
    figures["feature_cosine_min"] = min(figures[f"member{k}_feature_cosine_min"] for k in range(len(dims)))
    figures["feature_max_abs_diff"] = max(figures[f"member{k}_feature_max_abs_diff"] for k in range(len(dims)))
    return figures


def _worst(old: float, new: float, pick: Callable[[float, float], float]) -> float:
    # NaN must stick: min()/max() would drop it depending on argument order.
    return math.nan if math.isnan(old) or math.isnan(new) else pick(old, new)


def gate_parity(figures: dict[str, float]) -> None:
    """Raises EngineError when figures miss the thresholds (NaN always misses)."""
    cosine, prob_diff = figures["feature_cosine_min"], figures["prob_max_abs_diff"]
    if not (cosine >= PARITY_MIN_COSINE and prob_diff <= PARITY_MAX_PROB_DIFF):
        raise EngineError(
            f"parity check failed: feature cosine min {cosine:.6f} (need >= {PARITY_MIN_COSINE}), "
            f"prob max abs diff {prob_diff:.2e} (need <= {PARITY_MAX_PROB_DIFF:.0e})"
        )


def random_head(dims: Sequence[int] | int, hidden: int = 256, seed: int = 0) -> Head:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Head(dims, hidden).eval()


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def _reference(backbone: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images -> torch FP32 features, what a TensorRT plan is checked against."""

    def features(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = backbone(torch.from_numpy(np.ascontiguousarray(images))).float().numpy()
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
        parity = check_parity(ensemble, head, onnx_path)
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
            "transformers": transformers.__version__,
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
    head_checkpoint: Path,
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
) -> Path:
    """Builds an engine from backbone ids (hub ids, or random:<family>-tiny for tests) and a head.safetensors.

    The head checkpoint is the ensemble format (one member MLP per backbone,
    fusion, temperature) or, for one backbone, the older single-MLP format.
    Real backbones come from the local Hugging Face cache, or the network and
    a token for gated DINOv3 repos. torch_parts defaults off: they double the
    disk use.

    Raises:
        EngineError: a backbone cannot be loaded, the head does not fit the
            backbones, parity fails, or the target exists.
    """
    ids = (backbone_ids,) if isinstance(backbone_ids, str) else tuple(backbone_ids)
    if not ids:
        raise EngineError("build_engine needs at least one backbone id")
    try:
        head = Head.from_state(load_file(str(head_checkpoint)))
    except Exception as exc:  # safetensors, KeyError, ValueError and load_state_dict errors alike
        raise EngineError(f"{head_checkpoint}: cannot load head weights ({exc!r})") from exc
    if len(head.feature_dims) != len(ids):
        raise EngineError(
            f"{head_checkpoint}: head has {len(head.feature_dims)} members, {len(ids)} backbone ids given"
        )
    backbone = load_backbones(ids)
    if head.feature_dims != backbone.feature_dims:
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
