"""torch eager backend: the FP32 reference every other backend is checked against.

Its weights come from two optional engine parts: `backbone_config.json`
(the transformers DINOv3ViTConfig as JSON) and `backbone.safetensors`
(`Backbone.state_dict()`). The ONNX graph is not turned back into torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import structlog
import torch
from safetensors.torch import load_file

from svd.backends.base import blank_images, require_part
from svd.manifest import BACKBONE_CONFIG, BACKBONE_WEIGHTS, EngineError, Manifest
from svd.model import Backbone, backbone_from_state, numpy_to_tensor

log = structlog.get_logger(__name__)


def load_backbone_parts(engine_dir: Path, manifest: Manifest, backend: str = "torch") -> Backbone:
    """Rebuilds the torch Backbone from an engine dir's config and weights parts."""
    from transformers import DINOv3ViTConfig

    config_path = require_part(engine_dir, manifest, BACKBONE_CONFIG, backend)
    weights_path = require_part(engine_dir, manifest, BACKBONE_WEIGHTS, backend)
    try:
        config = DINOv3ViTConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise EngineError(f"{config_path}: not a DINOv3ViTConfig ({exc})") from exc
    try:
        backbone = backbone_from_state(config, load_file(str(weights_path)))
    except Exception as exc:  # safetensors and load_state_dict raise several types
        raise EngineError(f"{weights_path}: cannot load backbone weights ({exc})") from exc
    if backbone.feature_dim != manifest.feature_dim:
        raise EngineError(f"{config_path}: feature dim {backbone.feature_dim} != manifest {manifest.feature_dim}")
    return backbone


class TorchBackend:
    """Runs the backbone in torch eager mode, FP32.

    Args:
        threads: torch intra-op threads; 0 leaves torch's default.
        device: torch device; "cpu" unless a GPU worker passes "cuda".
    """

    name = "torch"

    def __init__(self, threads: int = 0, device: str = "cpu") -> None:
        self.threads = threads
        self.device = torch.device(device)
        self._backbone: Backbone | None = None

    def load(self, engine_dir: Path, manifest: Manifest) -> None:
        if self.threads > 0:
            torch.set_num_threads(self.threads)
        self._backbone = load_backbone_parts(engine_dir, manifest, self.name).to(self.device)
        log.info("torch_backend_loaded", path=str(engine_dir), device=str(self.device), threads=torch.get_num_threads())

    def warmup(self, batch_sizes: Sequence[int]) -> None:
        for batch_size in batch_sizes:
            self.features(blank_images(batch_size))

    def features(self, images: np.ndarray) -> np.ndarray:
        if self._backbone is None:
            raise RuntimeError("torch backend used before load() or after close()")
        with torch.inference_mode():
            batch = numpy_to_tensor(images).to(self.device)
            return self._backbone(batch).float().cpu().numpy()

    def close(self) -> None:
        self._backbone = None
