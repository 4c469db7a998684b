"""Fitting a head on cached features: class-balanced, early-stopped, seeded; then decision bias and temperature.

Runs as idle-lane slices on the engine worker (the head trains on the
accelerator the backbone uses): fit_head() is a generator, and each next()
does optimizer steps for at most `slice_ms` before yielding its Progress.

- Balance: validators ask 50/50 whatever the data's balance, so each class
  weighs half of every loss and metric here; within a class each image
  weighs the same however many views it has.
- Early stopping on the validation split's balanced loss (patience in
  epochs); the best epoch's weights are kept.
- Decision bias: validators round the served probability at 0.5, so the
  logit offset that maximises the balanced reward proxy on validation is
  folded into the fusion bias; 0.5 is then the decision point.
- Temperature: fitted last, on validation NLL, for calibration only: it
  divides the logit, so it cannot move a decision.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from svd.engine.head import Head, numpy_to_tensor, random_head
from svd.engine.worker import Progress

TEMPERATURE_RANGE = (0.05, 20.0)


@dataclass(frozen=True)
class FeatureSet:
    """Rows of backbone features with their labels and the image each row is a view of."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,) 0/1
    images: np.ndarray  # (N,) image index: views of one image share it

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def weights(self) -> np.ndarray:
        """Per-row weights: each class half the total, each image equal within its class."""
        w = np.zeros(len(self), dtype=np.float64)
        if not len(self):
            return w
        _, inverse, views = np.unique(self.images, return_inverse=True, return_counts=True)
        per_view = 1.0 / views[inverse]
        for cls in (0, 1):
            mask = self.labels == cls
            images_in_class = per_view[mask].sum()
            if images_in_class > 0:
                w[mask] = per_view[mask] / images_in_class * 0.5
        return w * len(self)  # mean weight 1, so losses keep their usual scale


@dataclass(frozen=True)
class FitConfig:
    hidden: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    seed: int = 0
    slice_ms: float = 25.0


@dataclass
class FitResult:
    head: Head
    epochs: int
    best_epoch: int
    val_loss: float
    decision_bias: float
    temperature: float
    history: list[dict[str, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "val_loss": round(self.val_loss, 6),
            "decision_bias": round(self.decision_bias, 6),
            "temperature": round(self.temperature, 6),
        }


def warm_optimiser() -> None:
    """The first AdamW a process makes imports torch._dynamo (over a second): do it here, off the
    engine thread, so no fit slice pays for it. Run it in a thread before submitting fit_head()."""
    param = torch.nn.Parameter(torch.zeros(1))
    torch.optim.AdamW([param], lr=1e-3)


def fit_head(
    train: FeatureSet, val: FeatureSet, dims: Sequence[int], cfg: FitConfig, device: str = "cpu"
) -> Generator[Progress, None, FitResult]:
    """Train a head for backbone members of widths `dims`, in slices; returns the fitted head.

    Raises:
        ValueError: a split lacks one of the classes (nothing to learn or to stop on).
    """
    for name, split in (("training", train), ("validation", val)):
        if len(split) == 0 or len(np.unique(split.labels)) < 2:
            raise ValueError(f"the {name} split needs both classes, has {np.bincount(split.labels, minlength=2)}")
    dev = torch.device(device)
    head = random_head(dims, cfg.hidden, cfg.seed).to(dev)  # train() below, each epoch
    optimiser = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    x, y, w = _tensors(train, dev)
    vx, vy, vw = _tensors(val, dev)
    order = np.random.default_rng(cfg.seed)
    best = (math.inf, 0, _state(head))
    history: list[dict[str, float]] = []
    budget = _SliceBudget(cfg.slice_ms)
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        perm = torch.from_numpy(order.permutation(len(train))).to(dev)
        for start in range(0, len(train), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            optimiser.zero_grad(set_to_none=True)
            loss = _weighted_bce(head(x[idx]), y[idx], w[idx])
            loss.backward()
            optimiser.step()
            if budget.spent():
                yield Progress(epoch, cfg.max_epochs, "fit")
                budget.restart()
        val_loss = _evaluate_loss(head, vx, vy, vw)
        history.append({"epoch": epoch, "val_loss": val_loss})
        yield Progress(epoch, cfg.max_epochs, "epoch", value=val_loss)
        if val_loss < best[0] - 1e-6:
            best = (val_loss, epoch, _state(head))
        elif epoch - best[1] >= cfg.patience:
            break
    head.load_state_dict(best[2])
    head.eval()
    yield Progress(epoch, cfg.max_epochs, "calibrate")
    bias, temperature = _decide_and_calibrate(head, vx, vy, vw)
    return FitResult(head.cpu(), epoch, best[1], best[0], bias, temperature, history)


def head_probs(head: Head, features: np.ndarray, device: str = "cpu", batch: int = 4096) -> np.ndarray:
    """The head's served probabilities for (N, D) features, as float64."""
    out = []
    dev = torch.device(device)
    head = head.to(dev).eval()
    with torch.inference_mode():
        for start in range(0, len(features), batch):
            chunk = numpy_to_tensor(np.ascontiguousarray(features[start : start + batch], dtype=np.float32))
            out.append(head.probs(chunk.to(dev)).double().cpu().numpy())
    head.cpu()
    return np.concatenate(out) if out else np.zeros(0)


class _SliceBudget:
    def __init__(self, slice_ms: float) -> None:
        self._limit = slice_ms / 1000.0
        self._start = time.perf_counter()

    def spent(self) -> bool:
        return time.perf_counter() - self._start >= self._limit

    def restart(self) -> None:
        self._start = time.perf_counter()


def _tensors(split: FeatureSet, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(split.features, dtype=np.float32)).to(dev)
    y = torch.from_numpy(split.labels.astype(np.float32)).to(dev)
    w = torch.from_numpy(split.weights().astype(np.float32)).to(dev)
    return x, y, w


def _weighted_bce(logits: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    losses = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")
    return (losses * w).sum() / w.sum()


def _state(head: Head) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in head.state_dict().items()}


def _evaluate_loss(head: Head, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> float:
    head.eval()
    with torch.inference_mode():
        return float(_weighted_bce(head(x), y, w))


def _decide_and_calibrate(head: Head, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[float, float]:
    """Fold the best decision offset into the fusion bias, then fit the temperature; both on validation."""
    with torch.inference_mode():
        logits = head(x).double().cpu().numpy()
    labels, weights = y.cpu().numpy().astype(int), w.cpu().numpy().astype(np.float64)
    offset = best_offset(logits, labels, weights)
    with torch.no_grad():
        head.fusion.bias.sub_(offset)
    temperature = fit_temperature(logits - offset, labels, weights)
    with torch.no_grad():
        head.temperature.fill_(temperature)
    return -offset, temperature


def best_offset(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """The logit t for which "logit > t" maximises the weighted reward proxy; the smallest |t| on ties.

    Every decision the data can tell apart is scored at once: sort the logits,
    and the weighted confusion counts at each cut come from cumulative sums.
    """
    order = np.argsort(logits, kind="stable")
    z, y, w = logits[order], labels[order], weights[order]
    pos_w, neg_w = np.where(y == 1, w, 0.0), np.where(y == 0, w, 0.0)
    # Cut i: rows i.. are predicted roadwork. Only cuts between distinct logits (and both ends) are real.
    tp = np.concatenate([np.cumsum(pos_w[::-1])[::-1], [0.0]])
    fp = np.concatenate([np.cumsum(neg_w[::-1])[::-1], [0.0]])
    fn, tn = pos_w.sum() - tp, neg_w.sum() - fp
    cuts = np.concatenate([[0], np.flatnonzero(np.diff(z) > 0) + 1, [len(z)]])
    below = np.concatenate([[z[0] - 1.0], z])[cuts] if len(z) else np.zeros(1)
    above = np.concatenate([z, [z[-1] + 1.0]])[cuts] if len(z) else np.zeros(1)
    thresholds = (below + above) / 2
    scores = _reward(tp[cuts], fp[cuts], tn[cuts], fn[cuts])
    # Prefer the decision point as it is (t = 0) when it ties with the best.
    here = int(np.searchsorted(z, 0.0, side="right"))
    at_zero = float(_reward(tp[[here]], fp[[here]], tn[[here]], fn[[here]])[0])
    best = int(np.argmax(scores - 1e-12 * np.abs(thresholds)))
    return 0.0 if at_zero >= scores[best] - 1e-12 else float(thresholds[best])


def weighted_reward(predicted: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """(0.5 * max(0, MCC) + 0.5 * accuracy) ** 3 on weighted confusion counts."""
    pos, neg = labels == 1, labels == 0
    counts = [weights[m].sum() for m in (pos & predicted, neg & predicted, neg & ~predicted, pos & ~predicted)]
    return float(_reward(*(np.asarray([c]) for c in counts))[0])


def _reward(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> np.ndarray:
    total = tp + fp + tn + fn
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = np.where(denom > 0, (tp * tn - fp * fn) / np.where(denom > 0, denom, 1.0), 0.0)
        accuracy = np.where(total > 0, (tp + tn) / np.where(total > 0, total, 1.0), 0.0)
    return np.asarray((0.5 * np.maximum(mcc, 0.0) + 0.5 * accuracy) ** 3)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """The T in TEMPERATURE_RANGE minimising the weighted NLL of sigmoid(logit / T) (golden-section, log scale)."""

    def nll(log_t: float) -> float:
        z = logits / math.exp(log_t)
        # log(1 + e^-z) for y=1 and log(1 + e^z) for y=0, stably.
        loss = np.where(labels == 1, np.logaddexp(0.0, -z), np.logaddexp(0.0, z))
        return float((loss * weights).sum() / max(weights.sum(), 1e-12))

    lo, hi = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    for _ in range(80):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if nll(a) <= nll(b):
            hi = b
        else:
            lo = a
    return float(math.exp((lo + hi) / 2))
