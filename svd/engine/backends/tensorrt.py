"""TensorRT backend: runs backbone.plan with torch owning every CUDA resource.

torch allocates the device buffers (its caching allocator), the plan's
scratch memory and the stream; TensorRT only receives raw pointers. No
pycuda: a second CUDA context beside torch's (the one training also uses) is a
known source of invalid-handle errors and wrong outputs (design.md).

One execution context, one optimization profile (dynamic batch). Device and
pinned host buffers are sized for the profile's max batch once at load, so a
batch costs two copies and one enqueue; larger batches are split.

Also here: the run-time facts of this machine (GPU model, architecture,
TensorRT version) and plan_usable(), the one test of whether an engine's
plan can serve here; plans are built in svd.engine.plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from svd.engine.backends.base import blank_images, require_part
from svd.engine.manifest import BACKBONE_PLAN, INPUT_NAME, OUTPUT_NAME, SERVED_INPUT, EngineError, Manifest

log = structlog.get_logger(__name__)

HWC = (SERVED_INPUT.height, SERVED_INPUT.width, SERVED_INPUT.channels)


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
        try:
            here = device_facts(device)
        except EngineError as exc:  # no TensorRT or no CUDA here: the reason
            return str(exc)
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


@lru_cache(maxsize=1)
def trt_logger() -> Any:
    """One TensorRT logger per process (TensorRT keeps a pointer to it); warnings and errors only."""
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


class TensorRTBackend:
    """Runs a TensorRT plan on one CUDA device.

    Args:
        device: CUDA device index.
    """

    name = "tensorrt"

    def __init__(self, device: int = 0) -> None:
        try:
            import tensorrt  # noqa: F401
            import torch
        except (ImportError, OSError) as exc:
            raise EngineError(f"TensorRT is not installed ({exc}); pip install 'svd[gpu]'") from exc
        if not torch.cuda.is_available():
            raise EngineError("TensorRT backend needs a CUDA device; torch sees none")
        self.device = device
        self.max_batch = 0
        self.feature_dim = 0
        self._state: dict[str, Any] | None = None

    def load(self, engine_dir: Path, manifest: Manifest) -> None:
        # Whether the plan's facts fit this machine was decided before (select.choose_backend).
        path = require_part(engine_dir, manifest, BACKBONE_PLAN, self.name)
        self.load_plan_bytes(path.read_bytes(), source=str(path), feature_dim=manifest.feature_dim)
        log.info("tensorrt_backend_loaded", path=str(path), max_batch=self.max_batch, **_facts(manifest.plan))

    def load_plan_bytes(self, blob: bytes, source: str, feature_dim: int | None = None) -> None:
        """Deserializes a plan and allocates its buffers.

        Raises:
            EngineError: TensorRT rejects the plan (corrupt, other GPU or TensorRT version)
                or its inputs/outputs are not uint8 images -> float32 (N, feature_dim).
        """
        import tensorrt as trt
        import torch

        # Everything on self.device: TensorRT binds an engine to the device current at deserialization.
        with torch.cuda.device(self.device):
            runtime = trt.Runtime(trt_logger())
            engine = runtime.deserialize_cuda_engine(blob)
            if engine is None:
                raise EngineError(
                    f"{source}: TensorRT {trt.__version__} cannot deserialize the plan "
                    "(corrupt, or built for another GPU or TensorRT version)"
                )
            dim = _check_io(engine, source, feature_dim)
            _, _, max_shape = engine.get_tensor_profile_shape(INPUT_NAME, 0)
            max_batch = int(max_shape[0])
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            if context is None:
                raise EngineError(f"{source}: TensorRT could not create an execution context")
            # Scratch memory from torch's allocator, not a cudaMalloc of TensorRT's own.
            # torch blocks are 512-byte aligned; TensorRT needs 256.
            scratch = torch.empty(max(1, int(engine.device_memory_size_v2)), dtype=torch.uint8, device="cuda")
            context.set_device_memory(scratch.data_ptr(), scratch.numel())
            state = {
                "runtime": runtime,
                "engine": engine,
                "context": context,
                "scratch": scratch,
                "stream": torch.cuda.Stream(),
                "d_in": torch.empty((max_batch, *HWC), dtype=torch.uint8, device="cuda"),
                "d_out": torch.empty((max_batch, dim), dtype=torch.float32, device="cuda"),
                # Pinned host staging: async copies need page-locked memory to overlap.
                "h_in": torch.empty((max_batch, *HWC), dtype=torch.uint8, pin_memory=True),
                "h_out": torch.empty((max_batch, dim), dtype=torch.float32, pin_memory=True),
            }
            # Buffers were allocated on the default stream; make them ready before our stream uses them.
            torch.cuda.synchronize()
        self._state, self.max_batch, self.feature_dim = state, max_batch, dim

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for batch_size in batch_sizes:
            self.features(blank_images(batch_size))

    def features(self, images: np.ndarray) -> np.ndarray:
        if self._state is None:
            raise RuntimeError("tensorrt backend used before load() or after close()")
        if images.dtype != np.uint8 or images.shape[1:] != HWC or images.shape[0] < 1:
            raise ValueError(
                f"images must be uint8 (N>=1, {HWC[0]}, {HWC[1]}, {HWC[2]}), got {images.dtype} {images.shape}"
            )
        out = np.empty((images.shape[0], self.feature_dim), dtype=np.float32)
        for start in range(0, images.shape[0], self.max_batch):
            chunk = images[start : start + self.max_batch]
            out[start : start + len(chunk)] = self._run(self._state, chunk)
        return out

    def _run(self, s: dict[str, Any], chunk: np.ndarray) -> np.ndarray:
        import torch

        n = chunk.shape[0]
        s["h_in"][:n].numpy()[...] = chunk
        context = s["context"]
        with torch.cuda.device(self.device), torch.cuda.stream(s["stream"]):
            s["d_in"][:n].copy_(s["h_in"][:n], non_blocking=True)
            if not context.set_input_shape(INPUT_NAME, (n, *HWC)):
                raise EngineError(f"TensorRT rejected input shape {(n, *HWC)} (profile max {self.max_batch})")
            context.set_tensor_address(INPUT_NAME, s["d_in"].data_ptr())
            context.set_tensor_address(OUTPUT_NAME, s["d_out"].data_ptr())
            if not context.execute_async_v3(s["stream"].cuda_stream):
                raise EngineError(f"TensorRT execute_async_v3 failed for a batch of {n}")
            s["h_out"][:n].copy_(s["d_out"][:n], non_blocking=True)
        s["stream"].synchronize()
        # Copy out: the pinned buffer is reused by the next batch.
        return s["h_out"][:n].numpy().copy()

    def close(self) -> None:
        if self._state is not None:
            self._state["stream"].synchronize()
        # Context before engine before runtime: dropping the dict in insertion order would
        # free the runtime first; release explicitly in reverse dependency order.
        state, self._state = self._state, None
        if state is not None:
            for key in ("context", "engine", "runtime"):
                state.pop(key)


def _check_io(engine: Any, source: str, feature_dim: int | None) -> int:
    import tensorrt as trt

    names = {
        engine.get_tensor_name(i): engine.get_tensor_mode(engine.get_tensor_name(i))
        for i in range(engine.num_io_tensors)
    }
    want = {INPUT_NAME: trt.TensorIOMode.INPUT, OUTPUT_NAME: trt.TensorIOMode.OUTPUT}
    if names != want:
        raise EngineError(
            f"{source}: plan tensors {sorted(names)} are not input {INPUT_NAME!r}, output {OUTPUT_NAME!r}"
        )
    if engine.get_tensor_dtype(INPUT_NAME) != trt.DataType.UINT8:
        raise EngineError(f"{source}: plan input is {engine.get_tensor_dtype(INPUT_NAME)}, want UINT8")
    if engine.get_tensor_dtype(OUTPUT_NAME) != trt.DataType.FLOAT:
        raise EngineError(f"{source}: plan output is {engine.get_tensor_dtype(OUTPUT_NAME)}, want FLOAT")
    in_shape = tuple(engine.get_tensor_shape(INPUT_NAME))
    if in_shape[1:] != HWC:
        raise EngineError(f"{source}: plan input shape {in_shape} is not (N, {HWC[0]}, {HWC[1]}, {HWC[2]})")
    out_shape = tuple(engine.get_tensor_shape(OUTPUT_NAME))
    dim = int(out_shape[-1])
    if len(out_shape) != 2 or dim <= 0 or (feature_dim is not None and dim != feature_dim):
        raise EngineError(f"{source}: plan output shape {out_shape} is not (N, {feature_dim or 'D'})")
    return dim


def _facts(plan: dict[str, Any] | None) -> dict[str, Any]:
    plan = plan or {}
    return {k: plan.get(k) for k in ("gpu", "arch", "tensorrt", "precision")}
