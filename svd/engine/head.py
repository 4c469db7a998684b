"""The engine's head: one small MLP per backbone member, fused, calibrated.

Serving, training and engine writing need only this and torch: no transformers
import, so a box without the `build` extra can still train and swap heads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import cast

import numpy as np
import torch
from torch import nn


def numpy_to_tensor(array: np.ndarray) -> torch.Tensor:
    """Zero-copy when possible; torch warns on read-only arrays (frombuffer, mmap), so copy those."""
    if not array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
    return torch.from_numpy(array)


class MemberHead(nn.Module):
    """Small MLP on one member's features -> one roadwork logit per image."""

    def __init__(self, feature_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(feature_dim)
        self.fc1 = nn.Linear(feature_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, 1)

    @property
    def feature_dim(self) -> int:
        return int(self.fc1.in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(features)))).squeeze(-1)


class LinearMemberHead(nn.Module):
    """One linear map from a member's features to its logit: an imported classifier's own layer, exactly
    (svd.engine.classifier), or an untrained head's zeros."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(feature_dim, 1)

    @property
    def feature_dim(self) -> int:
        return int(self.linear.in_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features).squeeze(-1)


# Keys of the single-MLP head.safetensors written before ensembles existed.
_OLD_HEAD_KEYS = ("norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


class Head(nn.Module):
    """The engine's head: one MemberHead per backbone member, fused, calibrated.

    fused = sum_k w_k * logit_k + b (fusion: Linear(K, 1)), and
    probability = sigmoid(fused / temperature); the temperature is fitted by
    calibration after training and travels in head.safetensors as a buffer.

    Args:
        feature_dims: D of each member, in manifest member order (an int: K = 1).
        hidden: hidden width of the member MLPs (one for all, or one each); 0: a
            linear member (LinearMemberHead) instead of an MLP.
    """

    temperature: torch.Tensor

    def __init__(self, feature_dims: Sequence[int] | int, hidden: Sequence[int] | int = 256) -> None:
        super().__init__()
        dims = (feature_dims,) if isinstance(feature_dims, int) else tuple(feature_dims)
        widths = (hidden,) * len(dims) if isinstance(hidden, int) else tuple(hidden)
        if not dims or len(widths) != len(dims):
            raise ValueError(f"a head needs one hidden width per member: dims {dims}, hidden {widths}")
        self.members = nn.ModuleList(
            MemberHead(d, h) if h else LinearMemberHead(d) for d, h in zip(dims, widths, strict=True)
        )
        self.fusion = nn.Linear(len(dims), 1)
        with torch.no_grad():
            self.fusion.weight.fill_(1.0 / len(dims))
            self.fusion.bias.zero_()
        self.register_buffer("temperature", torch.ones(()))

    @property
    def feature_dims(self) -> tuple[int, ...]:
        return tuple(cast(MemberHead | LinearMemberHead, m).feature_dim for m in self.members)

    @property
    def feature_dim(self) -> int:
        return sum(self.feature_dims)

    def member_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(N, sum D) -> (N, K): each member MLP on its own feature slice."""
        slices = torch.split(features, list(self.feature_dims), dim=-1)
        return torch.stack([head(part) for head, part in zip(self.members, slices, strict=True)], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Fused, uncalibrated logit per image, (N,)."""
        return self.fusion(self.member_logits(features)).squeeze(-1)

    def probs(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(features) / self.temperature)

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> Head:
        """Rebuilds a head from its state dict; sizes come from the tensor shapes.

        Also takes the single-MLP format of engines built before ensembles
        (norm/fc1/fc2/temperature at top level): it becomes K = 1 with fusion
        weight 1 and bias 0, which gives exactly the old probabilities.

        Raises:
            KeyError: a needed tensor is missing.
            ValueError: the temperature is not a positive number.
        """
        state = dict(state)
        if "fc1.weight" in state:
            state = {**{f"members.0.{k}": state[k] for k in _OLD_HEAD_KEYS}, "temperature": state["temperature"]}
            state["fusion.weight"] = torch.ones(1, 1)
            state["fusion.bias"] = torch.zeros(1)
        dims: list[int] = []
        widths: list[int] = []
        while True:
            k = len(dims)
            if (fc1 := state.get(f"members.{k}.fc1.weight")) is not None:
                widths.append(int(fc1.shape[0]))
                dims.append(int(fc1.shape[1]))
            elif (linear := state.get(f"members.{k}.linear.weight")) is not None:
                widths.append(0)
                dims.append(int(linear.shape[1]))
            else:
                break
        if not dims:
            raise KeyError("members.0.fc1.weight")
        temperature = state.get("temperature")
        if temperature is None or not bool(torch.all(torch.isfinite(temperature) & (temperature > 0))):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        head = cls(dims, widths)
        head.load_state_dict(state, strict=True)
        return head.eval()


def untrained_head(dims: Sequence[int] | int) -> Head:
    """A head that knows nothing yet: every logit 0, every probability exactly 0.5 (which validators round
    to "no roadwork": a constant predictor, MCC 0). An engine built without a head carries it until
    training gives it one (docs/engine-format.md, "Untrained engines")."""
    head = Head(dims, hidden=0)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
    return head.eval()


def random_head(dims: Sequence[int] | int, hidden: int = 256, seed: int = 0) -> Head:
    """A head with seeded random weights (demo engines, tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Head(dims, hidden).eval()
