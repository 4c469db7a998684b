"""TensorRT plans: build backbone.plan from backbone.onnx, gate it on parity, decide if it can serve here.

Precision. TensorRT 11 builds strongly typed networks only: the BuilderFlag
FP16/BF16/INT8 switches are gone and each layer runs in the type the graph
gives it. DINOv3 in FP16 is a known trap: NVIDIA/TensorRT#4723 (TRT 10.3,
ViT-B/L16 in FP16 give near-constant, wrong outputs, likely FP16 overflow in
attention/LayerNorm) and #4742 (TRT 10.4 gives NaN in FP16 and even a wrong
FP32 build, cosine 0.018 to torch). So FP16 is never used. We try, in order:

- "bf16": the graph with every MatMul's inputs cast to BF16 and its output
  cast back to FP32 (FP32 range, so no overflow; softmax, LayerNorm, residual
  adds and the features stay FP32). Tensor-core speed for the GEMMs.
- "tf32": the FP32 graph as exported; TF32 matmuls (BuilderFlag.TF32, on by
  default) round inputs to 10 mantissa bits but keep FP32 range.

Each candidate must pass the parity gate against torch FP32 (cosine >= 0.999
per image, NaN fails), which also catches a miscompile like #4742; the first
that passes is written. A plan serves only on the GPU architecture and the
exact TensorRT version it was built with (plans are not portable), see
plan_usable().
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from svd.manifest import SERVED_INPUT, EngineError

if TYPE_CHECKING:
    import onnx

log = structlog.get_logger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"
PRECISIONS = ("bf16", "tf32")
PLAN_MIN_COSINE = 0.999  # the same bar build.py sets for ONNX Runtime
MIN_BATCH = 1
DEFAULT_OPT_BATCH = 16
PARITY_SEED = 1234
# ONNX TensorProto element types (onnx.TensorProto.FLOAT, BFLOAT16, UINT8) without importing onnx here.
ONNX_FLOAT, ONNX_UINT8, ONNX_BFLOAT16 = 1, 2, 16


def plan_supported() -> bool:
    """True when TensorRT imports and torch sees a CUDA device."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """Why plans cannot be built or served on this machine, or None when they can."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its CUDA libraries are not
        return f"TensorRT is not installed ({exc}); pip install 'svd[gpu]'"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def device_facts(device: int = 0) -> dict[str, str]:
    """This machine's GPU name, architecture ("sm_90") and TensorRT version.

    Raises:
        EngineError: TensorRT or CUDA is absent.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise EngineError(reason)
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return {"gpu": torch.cuda.get_device_name(device), "arch": f"sm_{major}{minor}", "tensorrt": trt.__version__}


def plan_usable(plan_facts: Mapping[str, Any] | None, here: Mapping[str, str] | None = None) -> str | None:
    """None when a plan with these manifest facts can run here, else the reason it cannot.

    Args:
        plan_facts: the manifest's `plan` object.
        here: this machine's facts (device_facts()); looked up when omitted.
    """
    if not plan_facts:
        return "the manifest records no plan facts"
    for key in ("arch", "tensorrt"):
        if not isinstance(plan_facts.get(key), str):
            return f"the manifest's plan facts lack {key!r}"
    if here is None:
        reason = unavailable_reason()
        if reason is not None:
            return reason
        here = device_facts()
    if plan_facts["arch"] != here["arch"]:
        return f"plan built for {plan_facts['arch']}, this GPU is {here['arch']} ({here.get('gpu', '?')})"
    # Plans are tied to the exact TensorRT build, patch level included.
    if plan_facts["tensorrt"] != here["tensorrt"]:
        return f"plan built with TensorRT {plan_facts['tensorrt']}, this machine has {here['tensorrt']}"
    return None


def tensorrt_graph(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The exported graph made ready for TensorRT; the input model is not changed.

    A uint8 input is cast to float before its transpose (TensorRT takes uint8
    at the network edge and into Cast, not through every layer), and under
    "bf16" every MatMul runs on BF16 inputs with an FP32 result.
    """
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _cast_uint8_input_first(out)
    if precision == "bf16":
        cast_matmuls(out, ONNX_BFLOAT16)
    return out


def _cast_uint8_input_first(model: onnx.ModelProto) -> None:
    """Rewrites images -> Transpose -> Cast(float) as images -> Cast(float) -> Transpose, in place.

    Shape nodes that read the uint8 input read the float copy instead (same
    shape), so nothing but the Cast touches uint8 inside the network.
    """
    graph = model.graph
    inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type == ONNX_UINT8}
    for tr in list(graph.node):
        if tr.op_type != "Transpose" or tr.input[0] not in inputs:
            continue
        users = [n for n in graph.node if tr.output[0] in n.input]
        if len(users) != 1 or users[0].op_type != "Cast":
            continue
        cast = users[0]
        original, mid, final = tr.input[0], tr.output[0], cast.output[0]
        cast.input[0], cast.output[0] = original, mid
        tr.input[0], tr.output[0] = mid, final
        for node in graph.node:
            if node.op_type == "Shape" and node.input[0] == original:
                node.input[0] = mid
        # The cast reads only a graph input: first place keeps the graph topologically sorted.
        nodes = [cast, *(n for n in graph.node if n is not cast)]
        del graph.node[:]
        graph.node.extend(nodes)
        _drop_value_info(model, mid)


def _drop_value_info(model: onnx.ModelProto, name: str) -> None:
    # The swapped tensor changed dtype; a stale value_info would contradict it.
    keep = [v for v in model.graph.value_info if v.name != name]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)


def cast_matmuls(model: onnx.ModelProto, elem_type: int) -> int:
    """Runs every float MatMul in `elem_type`: Cast inputs in, Cast the product back to float.

    In place; returns the number of MatMuls rewritten. Other ops keep FP32.
    """
    from onnx import helper

    graph = model.graph
    nodes = list(graph.node)
    rewritten: list[Any] = []
    count = 0
    for node in nodes:
        if node.op_type != "MatMul":
            rewritten.append(node)
            continue
        count += 1
        low_inputs = []
        for k, name in enumerate(node.input):
            low = f"{node.name or 'matmul'}_{count}_in{k}_lowp"
            rewritten.append(helper.make_node("Cast", [name], [low], to=elem_type, name=f"{low}_cast"))
            low_inputs.append(low)
        product = node.output[0]
        low_out = f"{node.name or 'matmul'}_{count}_out_lowp"
        rewritten.append(helper.make_node("MatMul", low_inputs, [low_out], name=node.name or f"matmul_{count}"))
        rewritten.append(helper.make_node("Cast", [low_out], [product], to=ONNX_FLOAT, name=f"{low_out}_cast"))
    del graph.node[:]
    graph.node.extend(rewritten)
    return count


def canary_images(batch_size: int, seed: int = PARITY_SEED) -> np.ndarray:
    rng = np.random.default_rng(seed + batch_size)
    shape = (batch_size, SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)
    return rng.integers(0, 256, shape, dtype=np.uint8)


def compare_features(ours: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Worst per-image cosine and largest absolute difference; NaN anywhere gives cosine NaN."""
    ours64, ref64 = ours.astype(np.float64), ref.astype(np.float64)
    norms = np.linalg.norm(ours64, axis=1) * np.linalg.norm(ref64, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = (ours64 * ref64).sum(axis=1) / norms
    worst = float("nan") if not np.isfinite(ours64).all() else float(np.min(cosine))
    return {"feature_cosine_min": worst, "feature_max_abs_diff": float(np.max(np.abs(ours64 - ref64)))}


def parity_batches(max_batch: int) -> tuple[int, ...]:
    """Batch 1, an odd size, and the profile max: the shapes most likely to pick different kernels."""
    return tuple(sorted({1, min(7, max_batch), max_batch}))


def check_plan_parity(
    features: Callable[[np.ndarray], np.ndarray],
    reference: Callable[[np.ndarray], np.ndarray],
    batch_sizes: Sequence[int],
) -> dict[str, float]:
    """Runs the canary images through both and returns the worst figures over all batch sizes."""
    cosines, diffs = [], []
    for n in batch_sizes:
        images = canary_images(n)
        got = compare_features(features(images), reference(images))
        cosines.append(got["feature_cosine_min"])
        diffs.append(got["feature_max_abs_diff"])
    # np.min/np.max propagate NaN (builtin min() may drop it), so one NaN batch fails the gate.
    return {"feature_cosine_min": float(np.min(cosines)), "feature_max_abs_diff": float(np.max(diffs))}


def gate_plan_parity(figures: Mapping[str, float], precision: str) -> None:
    cosine = figures["feature_cosine_min"]
    if not cosine >= PLAN_MIN_COSINE:  # NaN fails too
        raise EngineError(
            f"TensorRT {precision} plan misses parity: feature cosine min {cosine:.6f} "
            f"(need >= {PLAN_MIN_COSINE}) against torch FP32 on the canary images"
        )


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    reference: Callable[[np.ndarray], np.ndarray],
    *,
    max_batch: int,
    opt_batch: int = DEFAULT_OPT_BATCH,
    precisions: Sequence[str] = PRECISIONS,
) -> dict[str, Any]:
    """Builds a TensorRT plan for backbone.onnx, checks it against torch FP32, writes it.

    Args:
        onnx_path: the exported backbone graph (uint8 "images" -> float32 "features").
        plan_path: where to write the serialized plan (only when parity passes).
        reference: torch FP32 backbone features for a uint8 (N, 224, 224, 3) batch.
        max_batch: the optimization profile's largest batch; larger batches are split at run time.
        opt_batch: the batch size TensorRT tunes kernels for (clamped to [1, max_batch]).
        precisions: candidates tried in order; the first that passes parity is kept.

    Returns:
        The facts for manifest.plan: gpu, arch, tensorrt, precision, profile,
        parity, build_seconds, and the candidates rejected on the way (rejected).

    Raises:
        EngineError: no TensorRT/CUDA here, or no candidate builds and passes parity.
    """
    if max_batch < MIN_BATCH:
        raise EngineError(f"max_batch must be >= {MIN_BATCH}, got {max_batch}")
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise EngineError(f"precisions {list(precisions)} must be a non-empty subset of {PRECISIONS}")
    here = device_facts()
    profile = {"min": MIN_BATCH, "opt": max(MIN_BATCH, min(opt_batch, max_batch)), "max": max_batch}
    rejected: dict[str, str] = {}
    batches = parity_batches(profile["max"])
    # Canary images depend only on the batch size: compute the torch reference once for all candidates.
    ref_cache: dict[int, np.ndarray] = {}

    def cached_reference(images: np.ndarray) -> np.ndarray:
        if len(images) not in ref_cache:
            ref_cache[len(images)] = reference(images)
        return ref_cache[len(images)]

    for precision in precisions:
        started = time.monotonic()
        try:
            blob = _build_serialized(onnx_path, precision, profile)
            build_seconds = time.monotonic() - started
            figures = _plan_parity(blob, cached_reference, batches)
            gate_plan_parity(figures, precision)
        except (EngineError, RuntimeError) as exc:  # RuntimeError: CUDA/TensorRT faults, OOM
            rejected[precision] = str(exc)
            log.warning("plan_candidate_rejected", precision=precision, reason=str(exc))
            continue
        plan_path.write_bytes(blob)
        facts = {
            **here,
            "precision": precision,
            "strongly_typed": True,
            "profile": profile,
            "parity": figures,
            "parity_batches": list(batches),
            "build_seconds": round(build_seconds, 2),
            "rejected": rejected,
        }
        log.info("plan_built", path=str(plan_path), bytes=len(blob), **{k: facts[k] for k in ("arch", "precision")})
        return facts
    detail = "; ".join(f"{p}: {why}" for p, why in rejected.items())
    raise EngineError(f"{onnx_path}: no TensorRT plan passed ({detail})")


def _build_serialized(onnx_path: Path, precision: str, profile: Mapping[str, int]) -> bytes:
    import onnx
    import tensorrt as trt

    from svd.backends.tensorrt import trt_logger

    graph = tensorrt_graph(onnx.load(str(onnx_path)), precision)
    builder = trt.Builder(trt_logger())
    # TensorRT 11: every network is strongly typed; the creation flag is deprecated and ignored.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger())
    if not parser.parse(graph.SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse the {precision} graph ({errors})")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if names != [INPUT_NAME]:
        raise EngineError(f"{onnx_path}: graph inputs {names} are not [{INPUT_NAME!r}]")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.TF32)
    hwc = (SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)
    opt = builder.create_optimization_profile()
    opt.set_shape(INPUT_NAME, (profile["min"], *hwc), (profile["opt"], *hwc), (profile["max"], *hwc))
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build the {precision} plan (see the TensorRT log lines)")
    return bytes(memoryview(serialized))


def _plan_parity(
    blob: bytes, reference: Callable[[np.ndarray], np.ndarray], batches: Sequence[int]
) -> dict[str, float]:
    from svd.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    try:
        backend.load_plan_bytes(blob, source="candidate plan")
        return check_plan_parity(backend.features, reference, batches)
    finally:
        backend.close()
