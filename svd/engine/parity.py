"""Parity: how close a compiled backbone's features are to the torch FP32 reference, and the gates on it.

Two gates use these figures. At build, the exported ONNX graph (ONNX Runtime
CPU, the session options svd serves with) must match torch: raw cosine per
member >= 0.999 and the fused probability within 1e-3. A TensorRT plan must
match too, and its precision can flatten features into a near-constant
output (NVIDIA/TensorRT#4723) whose raw cosine still passes: so plans are
also gated on the cosine after centring (subtracting the mean feature over
the canaries), which a near-constant output fails.

Figures are per ensemble member slice, so a large member cannot hide a broken
small one, and NaN anywhere fails every gate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from svd.engine.canary import canary_images
from svd.engine.manifest import INPUT_NAME, OUTPUT_NAME, EngineError

if TYPE_CHECKING:
    from torch import nn

    from svd.engine.head import Head

# The ONNX graph at build time.
PARITY_MIN_COSINE = 0.999
PARITY_MAX_PROB_DIFF = 1e-3
PARITY_BATCH_SIZES = (1, 4)
# A TensorRT plan: the same raw bar, and the centred one (lower: centring removes the
# shared component that inflates raw cosine).
PLAN_MIN_COSINE = PARITY_MIN_COSINE
PLAN_MIN_CENTRED_COSINE = 0.99

Features = Callable[[np.ndarray], np.ndarray]


def compare_features(ours: np.ndarray, ref: np.ndarray, member_dims: Sequence[int] | None = None) -> dict[str, float]:
    """Parity figures of `ours` against `ref` (N, D), per ensemble member slice.

    Args:
        ours, ref: features of the same N images.
        member_dims: each member's width in feature order (manifest feature_dims);
            None treats the features as one member.

    Returns:
        feature_cosine_min (worst per-image cosine over all members),
        feature_centred_cosine_min (the same after subtracting each side's
        mean feature over the N images; NaN when N < 2), feature_max_abs_diff,
        and per member k `member{k}_feature_cosine_min`,
        `member{k}_feature_centred_cosine_min`, `member{k}_feature_max_abs_diff`.
        NaN anywhere in `ours` makes the cosines NaN.
    """
    if ours.shape != ref.shape or ours.ndim != 2:
        raise EngineError(f"features shaped {ours.shape} cannot be compared with reference {ref.shape}")
    dims = list(member_dims) if member_dims is not None else [ref.shape[1]]
    if sum(dims) != ref.shape[1] or min(dims, default=0) <= 0:
        raise EngineError(f"member_dims {dims} do not split features of width {ref.shape[1]}")
    ours64, ref64 = ours.astype(np.float64), ref.astype(np.float64)
    finite = bool(np.isfinite(ours64).all())
    cuts = np.cumsum(dims)[:-1]
    figures: dict[str, float] = {}
    for k, (a, b) in enumerate(zip(np.split(ours64, cuts, axis=1), np.split(ref64, cuts, axis=1), strict=True)):
        centred = _min_cosine(a - a.mean(axis=0), b - b.mean(axis=0)) if len(a) > 1 else float("nan")
        figures[f"member{k}_feature_cosine_min"] = _min_cosine(a, b) if finite else float("nan")
        figures[f"member{k}_feature_centred_cosine_min"] = centred if finite else float("nan")
        figures[f"member{k}_feature_max_abs_diff"] = float(np.max(np.abs(a - b)))
    # np.min/np.max propagate NaN (builtin min() may drop it), so one NaN member fails the gate.
    for kind in ("cosine", "centred_cosine"):
        figures[f"feature_{kind}_min"] = float(
            np.min([figures[f"member{k}_feature_{kind}_min"] for k in range(len(dims))])
        )
    figures["feature_max_abs_diff"] = float(np.max(np.abs(ours64 - ref64)))
    return figures


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    with np.errstate(invalid="ignore", divide="ignore"):  # a zero vector gives NaN, which fails
        cosine = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.min(cosine))


def compare_on_canaries(
    features: Features, reference: Features, batch_sizes: Sequence[int], member_dims: Sequence[int] | None = None
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """Runs the canary images through both at each batch size; figures over all canaries together.

    Per-image cosine does not depend on how images were batched, so one
    comparison over every canary gives each batch's worst figures and a
    centring mean over more images than any one batch. Also returns both
    sides' features, for callers that judge more than features (the head's probabilities).
    """
    ours, ref = [], []
    for n in batch_sizes:
        images = canary_images(n)
        ours.append(features(images))
        ref.append(reference(images))
    ours_all, ref_all = np.concatenate(ours), np.concatenate(ref)
    return compare_features(ours_all, ref_all, member_dims), ours_all, ref_all


def check_plan_parity(
    features: Features, reference: Features, batch_sizes: Sequence[int], member_dims: Sequence[int] | None = None
) -> dict[str, float]:
    """A TensorRT plan's figures against torch FP32 on the canaries (see compare_on_canaries)."""
    return compare_on_canaries(features, reference, batch_sizes, member_dims)[0]


def parity_batches(max_batch: int) -> tuple[int, ...]:
    """Batch 1, an odd size, and the profile max: the shapes most likely to pick different kernels."""
    return tuple(sorted({1, min(7, max_batch), max_batch}))


def gate_plan_parity(figures: Mapping[str, float], precision: str) -> None:
    """Raises EngineError naming the worst member when the raw or centred cosine misses its bar (NaN misses)."""
    checks = (("feature_cosine_min", PLAN_MIN_COSINE), ("feature_centred_cosine_min", PLAN_MIN_CENTRED_COSINE))
    for key, bar in checks:
        value = figures[key]
        if not value >= bar:  # NaN fails too
            members = sorted(k for k in figures if k.startswith("member") and k.endswith(key))
            worst = next((m.split("_")[0] for m in members if not figures[m] >= bar), "?")
            raise EngineError(
                f"TensorRT {precision} plan misses parity: {key.removesuffix('_min').replace('_', ' ')} "
                f"min {value:.6f} (need >= {bar}) on {worst} against torch FP32 on the canary images"
            )


def check_onnx_parity(
    backbone: nn.Module, head: Head, onnx_path: Path, batch_sizes: Sequence[int] = PARITY_BATCH_SIZES
) -> dict[str, float]:
    """ONNX Runtime (CPU, serving's session options) against torch FP32: compare_features()'s
    figures plus prob_max_abs_diff, the fused calibrated probability's worst difference."""
    import torch

    from svd.engine.backends.onnx import make_session

    session = make_session(onnx_path, providers=["CPUExecutionProvider"])

    def onnx_features(images: np.ndarray) -> np.ndarray:
        (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(images)})
        return np.asarray(out, dtype=np.float32)

    def torch_features(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = backbone(torch.from_numpy(np.array(images))).float().numpy()
        return out

    figures, ours, ref = compare_on_canaries(onnx_features, torch_features, batch_sizes, head.feature_dims)
    with torch.inference_mode():
        probs = head.probs(torch.from_numpy(ours)) - head.probs(torch.from_numpy(ref))
    figures["prob_max_abs_diff"] = float(np.max(np.abs(probs.numpy().astype(np.float64))))
    return figures


def gate_parity(figures: Mapping[str, float]) -> None:
    """Raises EngineError when an ONNX graph's figures miss the thresholds (NaN always misses)."""
    cosine, prob_diff = figures["feature_cosine_min"], figures["prob_max_abs_diff"]
    if not (cosine >= PARITY_MIN_COSINE and prob_diff <= PARITY_MAX_PROB_DIFF):
        raise EngineError(
            f"parity check failed: feature cosine min {cosine:.6f} (need >= {PARITY_MIN_COSINE}), "
            f"prob max abs diff {prob_diff:.2e} (need <= {PARITY_MAX_PROB_DIFF:.0e})"
        )
