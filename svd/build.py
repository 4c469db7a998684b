"""Builds engine directories: export the backbone to ONNX, check parity, write atomically.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript).
For DINOv3 it gives a clean graph: the RoPE sin/cos tables fold to constants
and no `If` nodes remain, where the TorchScript exporter leaves ~3x more
nodes including data-dependent `If`s that TensorRT handles badly.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import structlog
import torch
import transformers
from safetensors.torch import load_file, save
from transformers import DINOv3ViTConfig

from svd.backends.onnx import INPUT_NAME, OUTPUT_NAME, make_session
from svd.manifest import (
    BACKBONE_CONFIG,
    BACKBONE_ONNX,
    BACKBONE_WEIGHTS,
    HEAD,
    SERVED_INPUT,
    EngineError,
    Manifest,
    utc_now,
    write_engine_dir,
)
from svd.model import Backbone, Head, feature_dim, load_pretrained_backbone, random_backbone, tiny_dinov3_config

log = structlog.get_logger(__name__)

DEFAULT_OPSET = 18
PARITY_MIN_COSINE = 0.999
PARITY_MAX_PROB_DIFF = 1e-3
PARITY_BATCH_SIZES = (1, 4)
MAX_EXPORT_BATCH = 1024
# Loggers that chatter at WARNING during every export (e.g. "torchvision is not installed").
_NOISY_LOGGERS = ("torch.onnx._internal.exporter._registration",)


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


def export_backbone_onnx(backbone: Backbone, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """Exports `backbone` to a single-file ONNX graph with a dynamic batch dimension.

    Input "images" uint8 [batch, 224, 224, 3]; output "features" float32 [batch, D].
    """
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
            external_data=False,
            verbose=False,
        )
    log.info("backbone_exported", path=str(path), opset=opset, bytes=path.stat().st_size)


def check_parity(
    backbone: Backbone,
    head: Head,
    onnx_path: Path,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> dict[str, float]:
    """Compares ONNX Runtime features and probs with torch FP32 on random images.

    Returns the worst figures over all batch sizes: feature_max_abs_diff,
    feature_cosine_min and prob_max_abs_diff.
    """
    session = make_session(onnx_path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    figures = {"feature_max_abs_diff": 0.0, "feature_cosine_min": 1.0, "prob_max_abs_diff": 0.0}
    for n in batch_sizes:
        images = rng.integers(0, 256, (n, SERVED_INPUT.height, SERVED_INPUT.width, 3), dtype=np.uint8)
        (ours,) = session.run([OUTPUT_NAME], {INPUT_NAME: images})
        with torch.inference_mode():
            ref_t = backbone(torch.from_numpy(images))
            ours_t = torch.from_numpy(np.asarray(ours, dtype=np.float32))
            cosine = torch.nn.functional.cosine_similarity(ours_t, ref_t, dim=1).min().item()
            prob_diff = (head.probs(ours_t) - head.probs(ref_t)).abs().max().item()
            feat_diff = (ours_t - ref_t).abs().max().item()
        figures["feature_max_abs_diff"] = max(figures["feature_max_abs_diff"], feat_diff)
        figures["feature_cosine_min"] = min(figures["feature_cosine_min"], cosine)
        figures["prob_max_abs_diff"] = max(figures["prob_max_abs_diff"], prob_diff)
    return figures


def gate_parity(figures: dict[str, float]) -> None:
    """Raises EngineError when figures miss the thresholds (NaN always misses)."""
    cosine, prob_diff = figures["feature_cosine_min"], figures["prob_max_abs_diff"]
    if not (cosine >= PARITY_MIN_COSINE and prob_diff <= PARITY_MAX_PROB_DIFF):
        raise EngineError(
            f"parity check failed: feature cosine min {cosine:.6f} (need >= {PARITY_MIN_COSINE}), "
            f"prob max abs diff {prob_diff:.2e} (need <= {PARITY_MAX_PROB_DIFF:.0e})"
        )


def random_head(dim: int, hidden: int = 256, seed: int = 0) -> Head:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Head(dim, hidden).eval()


def _tensor_bytes(state: dict[str, torch.Tensor]) -> bytes:
    return save({k: v.detach().contiguous().cpu() for k, v in state.items()})


def assemble_engine(
    target: Path,
    backbone: Backbone,
    head: Head,
    manifest: Manifest,
    *,
    opset: int = DEFAULT_OPSET,
    torch_parts: bool = True,
    poison_head: bool = False,
) -> Path:
    """Exports, parity-checks and writes one engine directory at `target`.

    Args:
        target: the engine directory to create (must not exist).
        backbone: the backbone to export; its torch FP32 output is the reference.
        head: the trained (or random) head.
        manifest: everything but parity, export and parts, which are filled here.
        opset: ONNX opset for the export.
        torch_parts: also write backbone.safetensors + backbone_config.json so
            the torch reference backend can serve this engine.
        poison_head: test hook; fill the head's last layer with NaN after the
            parity gate so the engine loads normally but yields NaN.
    """
    if target.exists():
        raise EngineError(f"{target}: engine directory already exists; engines are immutable")
    with tempfile.TemporaryDirectory(prefix="svd-build-") as work:
        onnx_path = Path(work) / BACKBONE_ONNX
        export_backbone_onnx(backbone, onnx_path, opset)
        parity = check_parity(backbone, head, onnx_path)
        log.info("parity_checked", engine=manifest.name, **parity)
        gate_parity(parity)
        if poison_head:
            with torch.no_grad():
                head.fc2.weight.fill_(float("nan"))
        parts: dict[str, Path | bytes] = {BACKBONE_ONNX: onnx_path, HEAD: _tensor_bytes(head.state_dict())}
        if torch_parts:
            parts[BACKBONE_WEIGHTS] = _tensor_bytes(backbone.state_dict())
            parts[BACKBONE_CONFIG] = backbone.vit.config.to_json_string(use_diff=False).encode("utf-8")
        export = {
            "exporter": "torch.onnx.export(dynamo=True)",
            "opset": opset,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
        full = replace(manifest, parity=parity, export=export)
        write_engine_dir(target, full, parts)
    return target


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
) -> Path:
    """Builds `engines_dir/<name>` from a seeded random tiny DINOv3 and head; never downloads.

    Args:
        engines_dir: the engines folder; created if missing.
        name: engine directory name.
        seed: seeds the backbone (seed) and head (seed + 1) weights.
        config: backbone config; default tiny_dinov3_config() (ViT-Ti-like).
        head_hidden: hidden width of the head MLP.
        flip_tta, threshold, version: recorded in the manifest.
        opset: ONNX opset for the export.
        torch_parts: include the torch reference backend's parts.
        head_nan: test hook, see assemble_engine(poison_head=...).

    Raises:
        EngineError: parity failed or the target exists; nothing is written.
    """
    config = config or tiny_dinov3_config()
    backbone = random_backbone(config, seed)
    dim = feature_dim(config)
    ident = f"random:dinov3-vit-h{config.hidden_size}-l{config.num_hidden_layers}-seed{seed}"
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_now(),
        backbone_ids=(ident,),
        input=SERVED_INPUT,
        feature_dim=dim,
        flip_tta=flip_tta,
        threshold=threshold,
    )
    head = random_head(dim, head_hidden, seed + 1)
    return assemble_engine(
        engines_dir / name, backbone, head, manifest, opset=opset, torch_parts=torch_parts, poison_head=head_nan
    )


def build_engine(
    head_checkpoint: Path,
    backbone_id: str,
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
) -> Path:
    """Builds an engine from a real hub backbone and a trained head.safetensors.

    Needs the backbone in the local Hugging Face cache (or network and a token
    for gated DINOv3 repos). torch_parts defaults off: they double the disk use.
    """
    backbone = load_pretrained_backbone(backbone_id)
    head = Head.from_state(load_file(str(head_checkpoint)))
    if head.feature_dim != backbone.feature_dim:
        raise EngineError(
            f"{head_checkpoint}: head takes {head.feature_dim} features, backbone gives {backbone.feature_dim}"
        )
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_now(),
        backbone_ids=(backbone_id,),
        input=SERVED_INPUT,
        feature_dim=backbone.feature_dim,
        flip_tta=flip_tta,
        threshold=threshold,
        train_run_id=train_run_id,
        holdout_metrics=dict(holdout_metrics or {}),
    )
    return assemble_engine(engines_dir / name, backbone, head, manifest, opset=opset, torch_parts=torch_parts)
