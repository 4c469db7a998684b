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

import io
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog

from svd.engine.manifest import SERVED_INPUT, EngineError

if TYPE_CHECKING:
    import onnx

log = structlog.get_logger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "features"
PRECISIONS = ("bf16-linear", "tf32")
PLAN_MIN_COSINE = 0.999  # the same bar build.py sets for ONNX Runtime
# Cosine after subtracting the mean feature over the canaries: the part of the
# features that tells images apart. A near-constant output scores ~0 here while
# its raw cosine can still pass 0.999. Lower than the raw bar because centring
# removes the shared component that inflates raw cosine.
PLAN_MIN_CENTRED_COSINE = 0.99
MIN_BATCH = 1
DEFAULT_OPT_BATCH = 16
PARITY_SEED = 1234
# Canary image kinds, cycled through a batch; a batch of 1 is a street scene.
CANARY_KINDS = ("scene", "noise", "gradient", "checkerboard", "blocks")
# ONNX TensorProto element types (onnx.TensorProto.FLOAT, BFLOAT16, UINT8) without importing onnx here.
ONNX_FLOAT, ONNX_UINT8, ONNX_BFLOAT16 = 1, 2, 16
# Ops whose second input, when a weight initializer, makes them a linear layer.
LINEAR_OPS = ("MatMul", "Gemm")


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


def plan_usable(
    plan_facts: Mapping[str, Any] | None, here: Mapping[str, str] | None = None, *, device: int = 0
) -> str | None:
    """None when a plan with these manifest facts can run here, else the reason it cannot.

    Args:
        plan_facts: the manifest's `plan` object.
        here: this machine's facts (device_facts()); looked up for `device` when omitted.
        device: the CUDA device the plan would run on.
    """
    if not plan_facts:
        return "the manifest records no plan facts"
    for key in ("gpu", "arch", "tensorrt"):
        if not isinstance(plan_facts.get(key), str):
            return f"the manifest's plan facts lack {key!r}"
    if here is None:
        reason = unavailable_reason()
        if reason is not None:
            return reason
        here = device_facts(device)
    if plan_facts["arch"] != here["arch"]:
        return f"plan built for {plan_facts['arch']}, this GPU is {here['arch']} ({here.get('gpu', '?')})"
    # Kernels are tuned for the exact GPU model: an H100 PCIe plan on an H100 SXM may load and run slower
    # or, across SKUs with other SM counts or memory, fail; the plan is rebuilt instead.
    if plan_facts["gpu"] != here.get("gpu"):
        return f"plan built on GPU model {plan_facts['gpu']!r}, this GPU is {here.get('gpu', '?')!r}"
    # Plans are tied to the exact TensorRT build, patch level included.
    if plan_facts["tensorrt"] != here["tensorrt"]:
        return f"plan built with TensorRT {plan_facts['tensorrt']}, this machine has {here['tensorrt']}"
    return None


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


# --- parity --------------------------------------------------------------------------------------


def canary_images(batch_size: int, seed: int = PARITY_SEED) -> np.ndarray:
    """Seeded uint8 (N, 224, 224, 3) images cycling through CANARY_KINDS.

    Structured images (decoded synthetic street scenes, gradients,
    checkerboards, colour blocks) beside uniform noise: noise alone drives a
    ViT into one corner of its feature space, where a broken plan can agree.
    """
    rng = np.random.default_rng(seed + batch_size)
    h, w, c = SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels
    kinds = [CANARY_KINDS[i % len(CANARY_KINDS)] for i in range(batch_size)]
    scenes = iter(_decoded_scenes(kinds.count("scene"), seed + batch_size))
    out = np.empty((batch_size, h, w, c), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    for i, kind in enumerate(kinds):
        if kind == "scene":
            out[i] = next(scenes)
        elif kind == "noise":
            out[i] = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
        elif kind == "gradient":
            slope = rng.uniform(-255, 255, (2, c))
            ramp = yy[..., None] * slope[0] + xx[..., None] * slope[1] + rng.uniform(0, 255, c)
            out[i] = np.clip(ramp, 0, 255).astype(np.uint8)
        elif kind == "checkerboard":
            cell = int(rng.integers(4, 57))
            dark, light = rng.integers(0, 256, (2, c))
            board = ((np.arange(h)[:, None] // cell + np.arange(w)[None, :] // cell) % 2).astype(bool)
            out[i] = np.where(board[..., None], light, dark).astype(np.uint8)
        else:  # colour blocks on a k x k grid
            k = int(rng.choice((2, 4, 7, 8, 14)))
            blocks = rng.integers(0, 256, (k, k, c), dtype=np.uint8)
            out[i] = np.repeat(np.repeat(blocks, -(-h // k), axis=0)[:h], -(-w // k), axis=1)[:, :w]
    return out


def _decoded_scenes(n: int, seed: int) -> list[np.ndarray]:
    from PIL import Image

    from svd.tools.bench import make_jpegs

    scenes = []
    for jpeg in make_jpegs(n, seed=seed):
        with Image.open(io.BytesIO(jpeg)) as im:
            rgb = im.convert("RGB").resize((SERVED_INPUT.width, SERVED_INPUT.height))
        scenes.append(np.asarray(rgb, dtype=np.uint8))
    return scenes


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
        `member{k}_feature_centred_cosine_min`. NaN anywhere in `ours` makes the cosines NaN.
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
    # np.min propagates NaN (builtin min() may drop it), so one NaN member fails the gate.
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


def parity_batches(max_batch: int) -> tuple[int, ...]:
    """Batch 1, an odd size, and the profile max: the shapes most likely to pick different kernels."""
    return tuple(sorted({1, min(7, max_batch), max_batch}))


def check_plan_parity(
    features: Callable[[np.ndarray], np.ndarray],
    reference: Callable[[np.ndarray], np.ndarray],
    batch_sizes: Sequence[int],
    member_dims: Sequence[int] | None = None,
) -> dict[str, float]:
    """Runs the canary images through both at each batch size; figures over all canaries together.

    Per-image cosine does not depend on how images were batched, so one
    comparison over every canary gives each batch's worst figures and a
    centring mean over more images than any one batch.
    """
    ours, ref = [], []
    for n in batch_sizes:
        images = canary_images(n)
        ours.append(features(images))
        ref.append(reference(images))
    return compare_features(np.concatenate(ours), np.concatenate(ref), member_dims)


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

    from svd.engine.backends.tensorrt import trt_logger

    builder = trt.Builder(trt_logger())
    # TensorRT 11: every network is strongly typed; the creation flag is deprecated and ignored.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, trt_logger())
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
    from svd.engine.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    try:
        backend.load_plan_bytes(blob, source="candidate plan")
        yield backend.features
    finally:
        backend.close()
