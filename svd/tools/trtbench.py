"""`python -m svd.tools.trtbench`: TensorRT plan vs ONNX Runtime throughput on this machine's card.

For a tiny (ViT-Ti shaped) and a ViT-S shaped random DINOv3 backbone, built
here as demo engines (no downloads), it prints p50 latency and images/s at
each batch size for ONNX Runtime (CUDA provider when onnxruntime-gpu has it,
else CPU) and, where TensorRT and CUDA exist, for a plan built in the
precision svd.plan picks. Numbers include the host<->device copies, as served.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from svd.engine.canary import canary_images
from svd.engine.manifest import BACKBONE_ONNX, BACKBONE_PLAN, read_manifest

MODELS = {
    # name: (hidden, layers, heads)
    "tiny": (192, 12, 3),
    "vits": (384, 12, 6),
}
DEFAULT_BATCHES = (1, 32)
WARMUP = 3


def time_batches(run: Callable[[np.ndarray], object], batch: int, iters: int) -> tuple[float, float]:
    """p50 seconds per call and images/s at that p50, after a short warm-up."""
    images = canary_images(batch, seed=7)
    for _ in range(WARMUP):
        run(images)
    samples = []
    for _ in range(iters):
        started = time.perf_counter()
        run(images)
        samples.append(time.perf_counter() - started)
    p50 = statistics.median(samples)
    return p50, batch / p50


def _line(model: str, backend: str, device: str, batch: int, p50: float, ips: float) -> str:
    return f"{model:6} {backend:22} {device:28} batch {batch:3}  p50 {p50 * 1e3:9.2f} ms  {ips:9.1f} img/s"


def _build_engine(root: Path, model: str) -> Path:
    from svd.engine.build import build_demo_engine
    from svd.engine.model import tiny_dinov3_config

    hidden, layers, heads = MODELS[model]
    config = tiny_dinov3_config(hidden_size=hidden, num_layers=layers, num_heads=heads)
    return build_demo_engine(root, name=model, config=config)


def _ort_rows(engine_dir: Path, model: str, batches: Sequence[int], iters: int) -> list[str]:
    from svd.engine.backends.onnx import OnnxBackend

    backend = OnnxBackend()
    backend.load(engine_dir, read_manifest(engine_dir))
    device = backend.providers[0].replace("ExecutionProvider", "")
    try:
        return [_line(model, "onnxruntime fp32", device, b, *time_batches(backend.features, b, iters)) for b in batches]
    finally:
        backend.close()


def _plan_for(engine_dir: Path, model: str, max_batch: int) -> tuple[Path, dict[str, Any]]:
    """The plan build_demo_engine already wrote on a GPU box, else one built here."""
    manifest = read_manifest(engine_dir)
    if manifest.plan and BACKBONE_PLAN in manifest.parts and manifest.plan["profile"]["max"] >= max_batch:
        return engine_dir / BACKBONE_PLAN, manifest.plan
    import torch

    from svd.engine.backends.torch import load_backbone_parts
    from svd.engine.plan import build_plan

    reference_model = load_backbone_parts(engine_dir, manifest).cuda()

    def reference(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = reference_model(torch.from_numpy(images).cuda()).float().cpu().numpy()
        return out

    plan_path = engine_dir.parent / f"{model}.plan"
    return plan_path, build_plan(engine_dir / BACKBONE_ONNX, plan_path, reference, max_batch=max_batch)


def _trt_rows(engine_dir: Path, model: str, batches: Sequence[int], iters: int) -> list[str]:
    from svd.engine.backends.tensorrt import TensorRTBackend

    plan_path, facts = _plan_for(engine_dir, model, max(batches))
    print(
        f"{model}: plan {facts['precision']} on {facts['gpu']} ({facts['arch']}), TensorRT {facts['tensorrt']}, "
        f"profile {facts['profile']}, built in {facts['build_seconds']} s, "
        f"cosine min {facts['parity']['feature_cosine_min']:.6f}"
        + (f", rejected {facts['rejected']}" if facts.get("rejected") else "")
    )
    backend = TensorRTBackend()
    backend.load_plan_bytes(plan_path.read_bytes(), source=str(plan_path))
    label = f"tensorrt {facts['precision']}"
    try:
        return [_line(model, label, facts["gpu"], b, *time_batches(backend.features, b, iters)) for b in batches]
    finally:
        backend.close()


def main(argv: Sequence[str] | None = None) -> int:
    from svd.engine.backends.tensorrt import unavailable_reason

    parser = argparse.ArgumentParser(prog="python -m svd.tools.trtbench", description=__doc__)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=list(DEFAULT_BATCHES))
    parser.add_argument("--iters", type=int, default=20, help="timed calls per batch size (after 3 warm-up calls)")
    args = parser.parse_args(argv)
    why_not = unavailable_reason()
    if why_not is not None:
        print(f"TensorRT not available: {why_not}; timing ONNX Runtime only")
    with tempfile.TemporaryDirectory(prefix="svd-trtbench-") as work:
        for model in args.models:
            engine_dir = _build_engine(Path(work), model)
            rows = _ort_rows(engine_dir, model, args.batches, args.iters)
            if why_not is None:
                rows += _trt_rows(engine_dir, model, args.batches, args.iters)
            print("\n".join(rows), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
