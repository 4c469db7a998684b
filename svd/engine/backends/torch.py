"""torch eager backend: the FP32 reference every other backend is checked against.

Its weights come from two optional engine parts: `backbone_config.json` and
`backbone.safetensors` (`EnsembleBackbone.state_dict()`). The config is
`{"members": [{"family": ..., "config": <transformers config dict>}, ...]}`;
engines built before ensembles hold a bare DINOv3ViTConfig there and a
`Backbone.state_dict()` (keys `vit.*`), which load as a one-member ensemble.
The ONNX graph is not turned back into torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from safetensors.torch import load_file

from svd.engine.backends.base import blank_images, require_part
from svd.engine.head import numpy_to_tensor
from svd.engine.manifest import BACKBONE_CONFIG, BACKBONE_WEIGHTS, EngineError, Manifest
from svd.engine.model import DINOV3, EnsembleBackbone, config_from_dict, member_from_config

log = structlog.get_logger(__name__)


def backbone_config_json(backbone: EnsembleBackbone) -> bytes:
    """What backbone_config.json holds for `backbone`."""
    members = [{"family": m.family, "config": m.config.to_dict()} for m in backbone.member_list]
    return json.dumps({"members": members}, indent=1, sort_keys=True).encode("utf-8")


def _member_specs(data: Any) -> list[tuple[str, dict[str, Any]]]:
    if isinstance(data, dict) and isinstance(data.get("members"), list):
        return [(str(m["family"]), dict(m["config"])) for m in data["members"]]
    if isinstance(data, dict):
        return [(DINOV3, data)]  # the pre-ensemble format: one DINOv3ViTConfig
    raise TypeError("top level must be an object")


def load_backbone_parts(engine_dir: Path, manifest: Manifest, backend: str = "torch") -> EnsembleBackbone:
    """Rebuilds the torch EnsembleBackbone from an engine dir's config and weights parts."""
    config_path = require_part(engine_dir, manifest, BACKBONE_CONFIG, backend)
    weights_path = require_part(engine_dir, manifest, BACKBONE_WEIGHTS, backend)
    try:
        specs = _member_specs(json.loads(config_path.read_text(encoding="utf-8")))
        members = [member_from_config(family, config_from_dict(family, config)) for family, config in specs]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EngineError(f"{config_path}: not a backbone config ({exc!r})") from exc
    families = tuple(m.family for m in manifest.members)
    if tuple(m.family for m in members) != families:
        raise EngineError(f"{config_path}: member families {[m.family for m in members]} != manifest {list(families)}")
    backbone = EnsembleBackbone(members)
    try:
        state = load_file(str(weights_path))
        if any(k.startswith("vit.") for k in state):  # pre-ensemble Backbone.state_dict()
            state = {f"members.0.{k}": v for k, v in state.items()}
        backbone.load_state_dict(state, strict=True)
    except Exception as exc:  # safetensors and load_state_dict raise several types
        raise EngineError(f"{weights_path}: cannot load backbone weights ({exc})") from exc
    if backbone.feature_dims != manifest.feature_dims:
        raise EngineError(f"{config_path}: feature dims {backbone.feature_dims} != manifest {manifest.feature_dims}")
    return backbone.eval()


class TorchBackend:
    """Runs the backbone (one member or an ensemble) in torch eager mode, FP32.

    Args:
        threads: torch intra-op threads; 0 leaves torch's default.
        device: torch device; "cpu" unless a GPU worker passes "cuda".
    """

    name = "torch"

    def __init__(self, threads: int = 0, device: str = "cpu") -> None:
        self.threads = threads
        self.device = torch.device(device)
        self._backbone: EnsembleBackbone | None = None

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
