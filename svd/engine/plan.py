"""TensorRT plans: build backbone.plan from backbone.onnx, gate it on parity, decide if it can serve here.

Precision. TensorRT 11 builds strongly typed networks only: the BuilderFlag
FP16/BF16/INT8 switches are gone and each layer runs in the type the graph
gives it. DINOv3 in FP16 is a known trap: NVIDIA/TensorRT#4723 (TRT 10.3,
ViT-B/L16 in FP16 give near-constant, wrong outputs, likely FP16 overflow in
attention/LayerNorm) and #4742 (TRT 10.4 gives NaN in FP16 and even a wrong
FP32 build, cosine 0.018 to torch). So FP16 is never used. We try, in order:

- "bf16-linear": the linear layers only (MatMul/Gemm with a weight
  initializer) run on BF16 inputs with the product cast back to FP32. The
  attention matmuls (Q.K^T and scores.V, activation x activation), softmax,
  LayerNorm, residual adds and the features stay FP32: rounding the scores
  to 8 mantissa bits before softmax is where BF16 hurts most.
- "tf32": the FP32 graph as exported; TF32 matmuls (BuilderFlag.TF32, on by
  default) round inputs to 10 mantissa bits but keep FP32 range.

Each candidate must pass the parity gate against torch FP32 on structured
and noise canary images, per ensemble member slice: raw cosine >= 0.999 per
image and, after subtracting the batch mean feature, cosine >= 0.99 (so a
near-constant output like #4723 fails); NaN fails. That also catches a
miscompile like #4742. The first candidate that passes is written. A plan
serves only on the exact GPU model, architecture and TensorRT version it
was built with (plans are not portable), see plan_usable().
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from svd.engine.backends import tensorrt as trt_backend
from svd.engine.manifest import INPUT_NAME, SERVED_INPUT, EngineError
from svd.engine.parity import check_plan_parity, gate_plan_parity, parity_batches

if TYPE_CHECKING:
    import onnx

log = structlog.get_logger(__name__)

PRECISIONS = ("bf16-linear", "tf32")
MIN_BATCH = 1
DEFAULT_OPT_BATCH = 16
# ONNX TensorProto element types (onnx.TensorProto.FLOAT, BFLOAT16, UINT8) without importing onnx here.
ONNX_FLOAT, ONNX_UINT8, ONNX_BFLOAT16 = 1, 2, 16
# Ops whose second input, when a weight initializer, makes them a linear layer.
LINEAR_OPS = ("MatMul", "Gemm")


def plan_supported() -> bool:
    """True when plans can be built here: TensorRT imports and torch sees a CUDA device."""
    return trt_backend.unavailable_reason() is None


# --- the graph TensorRT is given -----------------------------------------------------------------


def load_graph(onnx_path: Path) -> onnx.ModelProto:
    """backbone.onnx without its external weights: they stay in backbone.onnx.data.

    Initializers keep their `location` (relative to the graph's folder), so a
    rewritten graph still names the same data file; TensorRT reads it given
    the graph's path. Loading the weights would make a >2 GB proto that
    protobuf cannot serialize.
    """
    import onnx

    return onnx.load(str(onnx_path), load_external_data=False)


def tensorrt_graph(model: onnx.ModelProto, precision: str) -> onnx.ModelProto:
    """The exported graph made ready for TensorRT; the input model is not changed.

    A uint8 input is cast to float as it enters (TensorRT takes uint8 at the
    network edge and into Cast, not through Transpose or Shape), and under
    "bf16-linear" the linear layers run on BF16 inputs with an FP32 result.
    """
    import onnx

    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    cast_uint8_inputs(out)
    if precision == "bf16-linear":
        cast_linear_layers(out, ONNX_BFLOAT16)
    return out


def cast_uint8_inputs(model: onnx.ModelProto) -> int:
    """Puts one Cast(float) right after each uint8 graph input and points every consumer at it.

    In place; returns the number of inputs cast. A Cast(float) further on that
    now reads float (the exporter's Transpose -> Cast) is dropped, its readers
    re-pointed to its input; value_info that the new dtypes contradict is removed.
    """
    from onnx import helper

    graph = model.graph
    uint8 = [i.name for i in graph.input if i.type.tensor_type.elem_type == ONNX_UINT8]
    if not uint8:
        return 0
    taken = _tensor_names(graph)
    casts = []
    for name in uint8:
        floated = _fresh(f"{name}_float", taken)
        _rename_reads(graph, name, floated)
        casts.append(helper.make_node("Cast", [name], [floated], to=ONNX_FLOAT, name=f"{floated}_cast"))
    # The casts read only graph inputs: first place keeps the graph topologically sorted.
    nodes = [*casts, *graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    types = _elem_types(model)
    outputs = {o.name for o in graph.output}
    for node in list(graph.node):
        redundant = node.op_type == "Cast" and _cast_to(node) == ONNX_FLOAT and types.get(node.input[0]) == ONNX_FLOAT
        if redundant and node.output[0] not in outputs:
            source, target = node.input[0], node.output[0]
            graph.node.remove(node)
            _rename_reads(graph, target, source)
    produced = {o for n in graph.node for o in n.output}
    keep = [v for v in graph.value_info if v.name in produced and types.get(v.name) == v.type.tensor_type.elem_type]
    del graph.value_info[:]
    graph.value_info.extend(keep)
    return len(uint8)


def cast_linear_layers(model: onnx.ModelProto, elem_type: int) -> int:
    """Runs every linear layer (MatMul/Gemm whose second input is a float weight) in `elem_type`.

    Each input tensor is cast once, however many layers read it (the
    LayerNorm output feeding Q, K and V), and each product is cast back to
    float. Attention matmuls (two activations) and every other op keep FP32.
    In place; returns the number of layers rewritten.
    """
    import onnx
    from onnx import helper

    graph = model.graph
    weights = {i.name for i in graph.initializer if i.data_type == ONNX_FLOAT}
    taken = _tensor_names(graph)
    low: dict[str, str] = {}  # tensor -> its elem_type copy
    rewritten: list[Any] = []
    count = 0
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2 or node.input[1] not in weights:
            rewritten.append(node)
            continue
        count += 1
        inputs = []
        for name in node.input:
            if name and name not in low:  # "" is an absent optional input (Gemm's C)
                low[name] = _fresh(f"{name}_lowp", taken)
                rewritten.append(helper.make_node("Cast", [name], [low[name]], to=elem_type, name=f"{low[name]}_cast"))
            inputs.append(low.get(name, name))
        product = node.output[0]
        low_out = _fresh(f"{product}_lowp", taken)
        layer = onnx.NodeProto()
        layer.CopyFrom(node)  # keeps Gemm's alpha/beta/transA/transB
        del layer.input[:], layer.output[:]
        layer.input.extend(inputs)
        layer.output.append(low_out)
        rewritten.append(layer)
        rewritten.append(helper.make_node("Cast", [low_out], [product], to=ONNX_FLOAT, name=f"{low_out}_cast"))
    del graph.node[:]
    graph.node.extend(rewritten)
    return count


def _tensor_names(graph: onnx.GraphProto) -> set[str]:
    names = {i.name for i in (*graph.input, *graph.output, *graph.initializer, *graph.value_info)}
    return names | {t for n in graph.node for t in (*n.input, *n.output)}


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _rename_reads(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name == old:
                node.input[k] = new


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Every tensor's element type by ONNX type inference, on a copy without weights or stale value_info."""
    import onnx
    from onnx import helper

    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.data_type == ONNX_FLOAT:  # weights: only their type and shape matter, never copy the bytes
            if init.name not in declared:
                graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:  # small int tensors (Reshape targets) feed shape inference
            graph.initializer.append(init)
    inferred = onnx.shape_inference.infer_shapes(light).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.input, *inferred.output, *inferred.value_info)}
    types.update({i.name: i.data_type for i in inferred.initializer})
    return types


# --- build ---------------------------------------------------------------------------------------


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    reference: Callable[[np.ndarray], np.ndarray],
    *,
    max_batch: int,
    opt_batch: int = DEFAULT_OPT_BATCH,
    precisions: Sequence[str] = PRECISIONS,
    member_dims: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Builds a TensorRT plan for backbone.onnx, checks it against torch FP32, writes it.

    Args:
        onnx_path: the exported backbone graph (uint8 "images" -> float32 "features");
            its backbone.onnx.data, if any, is read from beside it.
        plan_path: where to write the serialized plan (only when parity passes).
        reference: torch FP32 backbone features for a uint8 (N, 224, 224, 3) batch.
        max_batch: the optimization profile's largest batch; larger batches are split at run time.
        opt_batch: the batch size TensorRT tunes kernels for (clamped to [1, max_batch]).
        precisions: candidates tried in order; the first that passes parity is kept.
        member_dims: the ensemble members' feature widths (manifest feature_dims), so
            parity is judged per member slice; None treats the features as one member.

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
    here = trt_backend.device_facts()
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
            with _loaded_plan(blob) as features:
                figures = check_plan_parity(features, cached_reference, batches, member_dims)
            gate_plan_parity(figures, precision)
        except Exception as exc:  # parity, ONNX, binding, CUDA/OOM faults alike: try the next precision
            rejected[precision] = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
            log.warning("plan_candidate_rejected", precision=precision, reason=rejected[precision])
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
    # The rewritten graph without weights: a few MB however large the backbone.
    graph = tensorrt_graph(load_graph(onnx_path), precision).SerializeToString()
    return _trt_build(graph, onnx_path, precision, profile)


def _trt_build(graph: bytes, onnx_path: Path, precision: str, profile: Mapping[str, int]) -> bytes:
    import tensorrt as trt

    builder = trt.Builder(trt_backend.trt_logger())
    # TensorRT 11: every network is strongly typed; the creation flag is deprecated and ignored.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_backend.trt_logger())
    # path: external weights are found by their location relative to the graph's folder.
    if not parser.parse(graph, path=str(onnx_path)):
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


@contextmanager
def _loaded_plan(blob: bytes) -> Iterator[Callable[[np.ndarray], np.ndarray]]:
    """A candidate plan loaded in TensorRTBackend, as its features function; closed on exit."""
    backend = trt_backend.TensorRTBackend()
    try:
        backend.load_plan_bytes(blob, source="candidate plan")
        yield backend.features
    finally:
        backend.close()
