"""Torch modules of an engine: image backbones (one or an ensemble) and the head.

A backbone takes what the decoder produces (uint8 RGB, NHWC, 224x224) and
does the float conversion, resizing and normalisation itself, so the exported
graph owns its preprocessing and the host ships 4x fewer bytes.

Families (each feature vector is D = 2 * hidden):
- DINOv3 ViT: final-layernormed CLS token + mean of the patch tokens
  (register tokens left out), the usual DINOv2/v3 linear-probe input: the CLS
  token carries the global summary, the patch mean keeps small local evidence.
- SigLIP2 vision tower (fixed-resolution checkpoints such as
  google/siglip2-so400m-patch14-384 are `SiglipModel`s): the attention-pooled
  output + mean of the post-layernormed patch tokens.
- ViT (transformers `ViTModel`, the encoder of a ViT image classifier such as
  the subnet's reference model): the final-layernormed CLS token (what the
  classifier's own linear layer reads) + mean of the patch tokens; its image
  processor's mean and std ride in its config (`image_mean`, `image_std`).

An ensemble runs K member backbones in one graph and concatenates their
features in member order. The head runs one small MLP per member on its
feature slice and fuses the K logits with learned weights and a bias; the
calibration temperature then gives prob = sigmoid(fused / T).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

# transformers is the `build` extra: serving an ONNX engine needs only Head,
# so it is imported where a backbone is built, not at module import.
if TYPE_CHECKING:
    from transformers import (
        DINOv3ViTConfig,
        DINOv3ViTModel,
        PretrainedConfig,
        SiglipVisionConfig,
        SiglipVisionModel,
        ViTConfig,
        ViTModel,
    )

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# SigLIP/SigLIP2 processors scale pixels to [-1, 1].
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
# Plain matmul/softmax attention exports to a small, portable ONNX graph and
# is exactly what ORT and TensorRT fuse; torch's SDPA path gains little here.
ATTN_IMPLEMENTATION = "eager"

DINOV3 = "dinov3"
SIGLIP2 = "siglip2"
VIT = "vit"
FAMILIES = (DINOV3, SIGLIP2, VIT)
# Test/demo ids: a seeded random tiny backbone instead of a hub download.
_RANDOM_ID = re.compile(r"random:(dinov3|siglip2|vit)-tiny(?:-seed(\d+))?")
_TINY_TEST_SIZES: dict[str, int] = {"hidden_size": 64, "num_layers": 2, "num_heads": 2}


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


def tiny_siglip2_config(
    hidden_size: int = 192,
    num_layers: int = 12,
    num_heads: int = 3,
    patch_size: int = 32,
    image_size: int = 256,
    mlp_ratio: int = 4,
) -> SiglipVisionConfig:
    """Builds a small SigLIP2 vision tower config for demos and tests.

    The default image_size (256) differs from the served 224 on purpose, so the
    in-graph resize that a real tower (384) needs is exercised too.

    Args:
        hidden_size: token width; divisible by num_heads.
        num_layers: transformer blocks.
        num_heads: attention heads (also of the attention-pooling head).
        patch_size: square patch side in pixels; must divide image_size.
        image_size: the tower's input side; 224 images are resized to it.
        mlp_ratio: MLP width as a multiple of hidden_size.
    """
    from transformers import SiglipVisionConfig

    if hidden_size % num_heads or image_size % patch_size:
        raise ValueError("hidden_size must be divisible by num_heads and image_size by patch_size")
    config = SiglipVisionConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * mlp_ratio,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        patch_size=patch_size,
        image_size=image_size,
        vision_use_head=True,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def tiny_vit_config(
    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, patch_size: int = 16, image_size: int = IMAGE_SIZE
) -> ViTConfig:
    """Builds a small ViT config (the encoder of a ViT image classifier) for tests.

    Args:
        hidden_size: token width; divisible by num_heads.
        num_layers: transformer blocks.
        num_heads: attention heads.
        patch_size: square patch side in pixels; must divide image_size.
        image_size: the encoder's input side; 224 images are resized to it.
    """
    from transformers import ViTConfig

    if hidden_size % num_heads or image_size % patch_size:
        raise ValueError("hidden_size must be divisible by num_heads and image_size by patch_size")
    config = ViTConfig(
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        patch_size=patch_size,
        image_size=image_size,
    )
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def feature_dim(config: PretrainedConfig) -> int:
    """D of one member backbone: two vectors of the hidden width (both families)."""
    return 2 * int(config.hidden_size)


def _normalised(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int) -> torch.Tensor:
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    if size != images.shape[1]:
        # The served input is fixed at 224 (one decoder, one input spec for all
        # members), but a tower's learned position embeddings belong to its own
        # grid (so400m: 384/14 = 27x27). Resizing the pixels keeps the tower
        # on the grid it was trained on; interpolating its position embeddings
        # instead would change the model. Bilinear because that is what the
        # SigLIP image processor uses, and it maps to one ONNX Resize that ORT
        # and TensorRT both run; no antialias, which only matters downscaling.
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


class MemberBackbone(nn.Module):
    """What every backbone family provides: uint8 NHWC (N, 224, 224, 3) -> float32 (N, feature_dim).

    Subclasses set `family`, own their normalisation constants and input size,
    and expose their transformers `config`.
    """

    family: str
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        # Not persistent: constants of the format, not weights of a checkpoint.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def config(self) -> PretrainedConfig:
        raise NotImplementedError

    @property
    def feature_dim(self) -> int:
        return feature_dim(self.config)


class Backbone(MemberBackbone):
    """DINOv3 ViT: uint8 NHWC images (N, 224, 224, 3) -> float32 features (N, 2 * hidden)."""

    family = DINOV3

    def __init__(self, vit: DINOv3ViTModel) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.vit = vit
        self.num_prefix = 1 + int(vit.config.num_register_tokens)

    @property
    def config(self) -> PretrainedConfig:
        return self.vit.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalised(images, self.mean, self.std, IMAGE_SIZE)
        tokens = self.vit(pixel_values=x).last_hidden_state
        cls = tokens[:, 0]
        patch_mean = tokens[:, self.num_prefix :].mean(dim=1)
        return torch.cat([cls, patch_mean], dim=-1)


class SiglipBackbone(MemberBackbone):
    """SigLIP2 vision tower: uint8 NHWC (N, 224, 224, 3) -> float32 (N, 2 * hidden).

    Features: the attention-pooled output (what SigLIP aligns with text, a
    strong global summary) + the mean of the post-layernormed patch tokens
    (local evidence, as for DINOv3).
    """

    family = SIGLIP2

    def __init__(self, tower: SiglipVisionModel) -> None:
        super().__init__(SIGLIP_MEAN, SIGLIP_STD)
        if not getattr(tower.config, "vision_use_head", True):
            raise ValueError("SigLIP vision tower has no pooling head (vision_use_head=False)")
        self.tower = tower
        size = tower.config.image_size
        if not isinstance(size, int):
            raise ValueError(f"SigLIP vision tower needs a square int image_size, got {size!r}")
        self.image_size = size

    @property
    def config(self) -> PretrainedConfig:
        return self.tower.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalised(images, self.mean, self.std, self.image_size)
        out = self.tower(pixel_values=x)
        return torch.cat([out.pooler_output, out.last_hidden_state.mean(dim=1)], dim=-1)


class ViTBackbone(MemberBackbone):
    """A ViT encoder (an image classifier's): uint8 NHWC (N, 224, 224, 3) -> float32 (N, 2 * hidden).

    Normalised with the mean and std its image processor used (kept in the
    config as image_mean / image_std; 0.5 when absent, the ViT processor's
    default), resized in the graph to the config's image_size when that is not 224.
    """

    family = VIT

    def __init__(self, vit: ViTModel) -> None:
        config = vit.config
        super().__init__(getattr(config, "image_mean", SIGLIP_MEAN), getattr(config, "image_std", SIGLIP_STD))
        self.vit = vit
        size = config.image_size
        if not isinstance(size, int):
            raise ValueError(f"ViT needs a square int image_size, got {size!r}")
        self.image_size = size

    @property
    def config(self) -> PretrainedConfig:
        return self.vit.config

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalised(images, self.mean, self.std, self.image_size)
        tokens = self.vit(pixel_values=x).last_hidden_state  # after the final layernorm
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=-1)


class EnsembleBackbone(nn.Module):
    """K member backbones in one graph: uint8 images -> concatenated features (N, sum D_k).

    K = 1 is a single backbone; its output is the member's, with no concat.
    """

    def __init__(self, members: Sequence[MemberBackbone]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member backbone")
        self.members = nn.ModuleList(members)

    @property
    def member_list(self) -> list[MemberBackbone]:
        return [cast(MemberBackbone, m) for m in self.members]

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(m.family for m in self.member_list)

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(m.feature_dim for m in self.member_list)

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        outputs = [member(images) for member in self.members]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def member_from_config(family: str, config: PretrainedConfig, seed: int | None = None) -> MemberBackbone:
    """A member backbone of `family` from its config; seeded random weights when `seed` is set."""
    from transformers import DINOv3ViTModel, SiglipVisionModel, ViTModel

    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(FAMILIES)}")
    config._attn_implementation = ATTN_IMPLEMENTATION
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if family == DINOV3:
            member: MemberBackbone = Backbone(DINOv3ViTModel(cast("DINOv3ViTConfig", config)))
        elif family == SIGLIP2:
            member = SiglipBackbone(SiglipVisionModel(cast("SiglipVisionConfig", config)))
        else:
            member = ViTBackbone(ViTModel(cast("ViTConfig", config), add_pooling_layer=False))
    return member.eval()


def config_from_dict(family: str, data: dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a member from its `to_dict()` JSON."""
    from transformers import DINOv3ViTConfig, SiglipVisionConfig, ViTConfig

    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; known: {', '.join(FAMILIES)}")
    classes: dict[str, type[PretrainedConfig]] = {DINOV3: DINOv3ViTConfig, SIGLIP2: SiglipVisionConfig, VIT: ViTConfig}
    config = classes[family].from_dict(data)
    config._attn_implementation = ATTN_IMPLEMENTATION
    return config


def random_backbone(config: DINOv3ViTConfig, seed: int = 0) -> Backbone:
    """A DINOv3 backbone with seeded random weights; never downloads."""
    member = member_from_config(DINOV3, config, seed)
    assert isinstance(member, Backbone)
    return member


def backbone_from_state(config: DINOv3ViTConfig, state: Mapping[str, torch.Tensor]) -> Backbone:
    """Rebuilds a DINOv3 backbone from its config and a `Backbone.state_dict()`."""
    backbone = member_from_config(DINOV3, config)
    backbone.load_state_dict(dict(state), strict=True)
    assert isinstance(backbone, Backbone)
    return backbone.eval()


def random_member_id(backbone_id: str) -> tuple[str, int] | None:
    """("siglip2", seed) for a test id like "random:siglip2-tiny-seed3"; None for hub ids."""
    match = _RANDOM_ID.fullmatch(backbone_id)
    return (match.group(1), int(match.group(2) or 0)) if match else None


def load_member(backbone_id: str) -> MemberBackbone:
    """One member backbone by id: `random:<family>-tiny[-seedN]` or a Hugging Face hub id.

    Hub ids load real weights with `from_pretrained` (the local cache first;
    gated DINOv3 repos need the user's token, HF_TOKEN or `hf auth login`).
    The family comes from the hub config's model_type.

    Raises:
        ValueError: an unknown family or an unsupported model type.
        OSError: the weights are neither cached nor downloadable.
    """
    random = random_member_id(backbone_id)
    if random is not None:
        family, seed = random
        tiny: dict[str, Callable[..., PretrainedConfig]] = {
            DINOV3: tiny_dinov3_config, SIGLIP2: tiny_siglip2_config, VIT: tiny_vit_config
        }  # fmt: skip
        return member_from_config(family, tiny[family](**_TINY_TEST_SIZES), seed)
    if backbone_id.startswith("random:"):
        raise ValueError(f"{backbone_id!r}: random ids are 'random:<dinov3|siglip2|vit>-tiny[-seedN]'")
    from transformers import AutoConfig, DINOv3ViTModel, SiglipVisionModel, ViTModel

    model_type = AutoConfig.from_pretrained(backbone_id).model_type
    if model_type == "dinov3_vit":
        return Backbone(DINOv3ViTModel.from_pretrained(backbone_id, attn_implementation=ATTN_IMPLEMENTATION)).eval()
    if model_type in ("siglip", "siglip_vision_model"):
        tower = SiglipVisionModel.from_pretrained(backbone_id, attn_implementation=ATTN_IMPLEMENTATION)
        return SiglipBackbone(tower).eval()
    if model_type == "vit":  # a ViT classifier's encoder; its head is dropped (svd.engine.classifier keeps it)
        vit = ViTModel.from_pretrained(backbone_id, attn_implementation=ATTN_IMPLEMENTATION, add_pooling_layer=False)
        with_processor_stats(vit.config, backbone_id)
        return ViTBackbone(vit).eval()
    # NaFlex SigLIP2 (model_type "siglip2") takes pre-patchified sequences with
    # per-image shapes and resizes position embeddings per image in a Python
    # loop: not a fixed-shape graph. The fixed-resolution checkpoints are.
    raise ValueError(
        f"{backbone_id}: model type {model_type!r} is not a supported backbone (DINOv3 ViT, SigLIP2 fixed-res)"
    )


def with_processor_stats(config: PretrainedConfig, repo: str) -> None:
    """Puts the repo's image processor's mean and std into the ViT config (ViTBackbone reads them there,
    and they travel with the config into the engine's backbone_config.json)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(repo)
    config.image_mean = [float(v) for v in processor.image_mean]
    config.image_std = [float(v) for v in processor.image_std]


def load_pretrained_backbone(model_id: str) -> Backbone:
    """Loads real DINOv3 weights from the Hugging Face hub (or its local cache)."""
    member = load_member(model_id)
    if not isinstance(member, Backbone):
        raise ValueError(f"{model_id}: not a DINOv3 ViT")
    return member
