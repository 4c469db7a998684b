"""Torch modules of an engine: the image backbone and the small head.

The backbone takes what the decoder produces (uint8 RGB, NHWC, 224x224) and
does the float conversion and ImageNet normalisation itself, so the exported
graph owns its preprocessing and the host ships 4x fewer bytes.

Feature vector: the final-layernormed CLS token concatenated with the mean of
the final-layernormed patch tokens (register tokens left out), D = 2 * hidden.
That is the usual DINOv2/v3 linear-probe input: the CLS token carries the
global summary, the patch mean keeps small local evidence (a cone, a barrier).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

# transformers is the `build` extra: serving an ONNX engine needs only Head,
# so it is imported where a backbone is built, not at module import.
if TYPE_CHECKING:
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Plain matmul/softmax attention exports to a small, portable ONNX graph and
# is exactly what ORT and TensorRT fuse; torch's SDPA path gains little here.
ATTN_IMPLEMENTATION = "eager"


def tiny_dinov3_config(
    hidden_size: int = 192,
    num_layers: int = 12,
    num_heads: int = 3,
    patch_size: int = 16,
    num_register_tokens: int = 4,
    mlp_ratio: int = 4,
) -> DINOv3ViTConfig:
    """Builds a small DINOv3 ViT config (ViT-Ti-like by default) for demos and tests.

    Args:
        hidden_size: token width; must be divisible by 4 * num_heads (RoPE).
        num_layers: transformer blocks.
        num_heads: attention heads.
        patch_size: square patch side in pixels.
        num_register_tokens: extra learned tokens beside CLS.
        mlp_ratio: MLP width as a multiple of hidden_size.
    """
    from transformers import DINOv3ViTConfig

    if hidden_size % (4 * num_heads):
        raise ValueError("hidden_size must be divisible by 4 * num_heads for 2D RoPE")
    config = DINOv3ViTConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * mlp_ratio,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        patch_size=patch_size,
        num_register_tokens=num_register_tokens,
        image_size=IMAGE_SIZE,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy when possible; torch warns on read-only arrays (frombuffer, mmap), so copy those."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    return torch.from_numpy(array)


def feature_dim(config: DINOv3ViTConfig) -> int:
    return 2 * int(config.hidden_size)


class Backbone(nn.Module):
    """uint8 NHWC images (N, 224, 224, 3) -> float32 features (N, 2 * hidden)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, vit: DINOv3ViTModel) -> None:
        super().__init__()
        self.vit = vit
        self.num_prefix = 1 + int(vit.config.num_register_tokens)
        # Not persistent: constants of the format, not weights of a checkpoint.
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.vit.config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        tokens = self.vit(pixel_values=x).last_hidden_state
        cls = tokens[:, 0]
        patch_mean = tokens[:, self.num_prefix :].mean(dim=1)
        return torch.cat([cls, patch_mean], dim=-1)


def random_backbone(config: DINOv3ViTConfig, seed: int = 0) -> Backbone:
    """A backbone with seeded random weights; never downloads."""
    from transformers import DINOv3ViTModel

    config._attn_implementation = ATTN_IMPLEMENTATION
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = DINOv3ViTModel(config)
    return Backbone(vit).eval()


def backbone_from_state(config: DINOv3ViTConfig, state: Mapping[str, torch.Tensor]) -> Backbone:
    """Rebuilds a backbone from its config and a `Backbone.state_dict()`."""
    from transformers import DINOv3ViTModel

    config._attn_implementation = ATTN_IMPLEMENTATION
    backbone = Backbone(DINOv3ViTModel(config))
    backbone.load_state_dict(dict(state), strict=True)
    return backbone.eval()


def load_pretrained_backbone(model_id: str) -> Backbone:
    """Loads real DINOv3 weights from the Hugging Face hub (or its local cache).

    Only for the operator's box: DINOv3 repositories are gated, so the first
    call needs a token. Tests and the demo never call this.
    """
    from transformers import DINOv3ViTModel

    vit = DINOv3ViTModel.from_pretrained(model_id, attn_implementation=ATTN_IMPLEMENTATION)
    return Backbone(vit).eval()


class Head(nn.Module):
    """Small MLP on backbone features -> one roadwork logit per image.

    probability = sigmoid(logit / temperature); the temperature is fitted by
    calibration after training and travels in head.safetensors as a buffer.
    """

    temperature: torch.Tensor

    def __init__(self, feature_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)
        self.register_buffer("temperature", torch.ones(()))

    @property
    def feature_dim(self) -> int:
        return int(self.fc1.in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features)))).squeeze(-1)

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(features) / self.temperature)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Head:
        """Rebuilds a head from its state dict; sizes come from the tensor shapes."""
        if "fc1.weight" not in state:
            raise KeyError("fc1.weight")
        hidden, dim = state["fc1.weight"].shape
        head = cls(int(dim), int(hidden))
        head.load_state_dict(dict(state), strict=True)
        return head.eval()
