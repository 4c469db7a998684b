"""Exports a backbone (one member or an ensemble) to the engine's ONNX graph.

Exporter: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript).
For DINOv3 it gives a clean graph: the RoPE sin/cos tables fold to constants
and no `If` nodes remain, where the TorchScript exporter leaves ~3x more
nodes including data-dependent `If`s that TensorRT handles badly.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog
import torch
from torch import nn

from svd.engine.manifest import INPUT_NAME, OUTPUT_NAME, SERVED_INPUT

log = structlog.get_logger(__name__)

DEFAULT_OPSET = 18
MAX_EXPORT_BATCH = 1024
# Above this many bytes of weights the graph keeps them in backbone.onnx.data:
# one protobuf cannot exceed 2 GiB (ViT-L + SigLIP2 so400m is ~2.9 GB in FP32).
EXTERNAL_DATA_BYTES = 1_800_000_000
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
