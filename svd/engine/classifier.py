"""`svd build-engine --classifier REPO`: a Hugging Face ViT image classifier as an engine.

The subnet's reference miner serves `natix-network-org/roadwork`, a ViT-B/16
fine-tuned for roadwork, through a transformers pipeline. Imported here it is
an engine like any other, and a day-one start that nightly training improves
on:

- its encoder is the backbone (ViT family: final-layernormed CLS token + patch
  mean; ONNX, parity-checked, a TensorRT plan on a GPU box), normalised with
  its image processor's mean and std inside the graph;
- its classifier is the head, exactly: for two labels, the probability of the
  positive one is softmax(Wx + b)[pos] = sigmoid((W[pos] - W[neg]) x +
  b[pos] - b[neg]), one linear member head on the CLS part of the features
  (zeros on the patch mean);
- its image processor's mapping is recorded in the manifest: squash to its
  size with its resampling filter, the full image decoded (no reduced JPEG
  decode), so the engine sees the pixels the pipeline sees.

The positive class is found by its label name ("Roadwork", any case), or named
with --positive-label. Only what maps exactly is taken: a ViT classifier with
two labels, a square 224 processor size, rescaling by 1/255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import torch

from svd.engine.build import DEFAULT_OPSET, PLAN_MAX_BATCH, assemble_engine
from svd.engine.head import Head, LinearMemberHead
from svd.engine.manifest import SERVED_INPUT, EngineError, Manifest, Member, utc_now
from svd.engine.model import ATTN_IMPLEMENTATION, VIT, EnsembleBackbone, ViTBackbone, feature_dim
from svd.engine.preprocess import RESAMPLES, Preprocess

log = structlog.get_logger(__name__)

POSITIVE_WORD = "roadwork"
# PIL's filter numbers, as image processors store them.
_PIL_FILTERS = {2: "bilinear", 3: "bicubic"}


def import_classifier(
    repo: str,
    engines_dir: Path,
    name: str,
    *,
    positive_label: str | None = None,
    version: str = "0.1.0",
    opset: int = DEFAULT_OPSET,
    torch_parts: bool = False,
    plan_max_batch: int = PLAN_MAX_BATCH,
) -> Path:
    """Writes engines_dir/<name> from the image classifier `repo` (a hub id, or a local folder).

    Raises:
        EngineError: it cannot be loaded, is not a two-label ViT classifier, its
            processor does not map exactly, parity fails, or the target exists.
    """
    model, processor = _load(repo)
    pos, neg = positive_index(model.config.id2label, positive_label, repo)
    mapping, mean, std = processor_mapping(processor, repo)
    config = model.vit.config
    config.image_mean, config.image_std = mean, std
    member = ViTBackbone(model.vit).eval()
    head = classifier_head(model.classifier.weight, model.classifier.bias, pos, neg, feature_dim(config))
    manifest = Manifest(
        name=name,
        version=version,
        created=utc_now(),
        backbone_ids=(repo,),
        input=SERVED_INPUT,
        feature_dim=feature_dim(config),
        members=(Member(repo, VIT, feature_dim(config)),),
        preprocess=mapping,
        export={"classifier": repo, "positive_label": model.config.id2label[pos]},
    )
    log.info("classifier_imported", repo=repo, positive=model.config.id2label[pos], preprocess=mapping.key)
    return assemble_engine(
        engines_dir / name,
        EnsembleBackbone([member]),
        head,
        manifest,
        opset=opset,
        torch_parts=torch_parts,
        plan_max_batch=plan_max_batch,
    )


def _load(repo: str) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoImageProcessor, ViTForImageClassification

    try:
        model_type = AutoConfig.from_pretrained(repo).model_type
        if model_type != "vit":
            raise EngineError(f"{repo}: model type {model_type!r}; --classifier imports ViT image classifiers")
        model = ViTForImageClassification.from_pretrained(repo, attn_implementation=ATTN_IMPLEMENTATION)
        processor = AutoImageProcessor.from_pretrained(repo)
    except EngineError:
        raise
    except (OSError, ValueError) as exc:  # not cached and no network, gated without a token, not a model
        raise EngineError(
            f"{repo}: cannot load the classifier ({exc}); it needs the local hub cache or the network, "
            "and a token for a gated repo (hf auth login)"
        ) from exc
    return model.eval(), processor


def positive_index(id2label: dict[int, str], wanted: str | None, repo: str) -> tuple[int, int]:
    """(positive, negative) label indices of a two-label classifier: the label named `wanted`
    (any case), else the one whose name contains "roadwork"."""
    labels = {int(i): str(label) for i, label in id2label.items()}
    if len(labels) != 2:
        raise EngineError(f"{repo}: {len(labels)} labels {sorted(labels.values())}; only two-label classifiers map")
    if wanted is not None:
        found = [i for i, label in labels.items() if label.lower() == wanted.lower()]
    else:
        found = [i for i, label in labels.items() if POSITIVE_WORD in label.lower()]
    if len(found) != 1:
        asked = f"--positive-label {wanted!r}" if wanted else f"a label containing {POSITIVE_WORD!r}"
        raise EngineError(f"{repo}: no single {asked} among {sorted(labels.values())}; name it with --positive-label")
    pos = found[0]
    return pos, next(i for i in labels if i != pos)


def processor_mapping(processor: Any, repo: str) -> tuple[Preprocess, list[float], list[float]]:
    """The image processor as (mapping, mean, std); EngineError when it does something svd cannot
    reproduce exactly."""
    size = getattr(processor, "size", None) or {}
    height, width = _get(size, "height"), _get(size, "width")
    if not getattr(processor, "do_resize", True) or (height, width) != (SERVED_INPUT.height, SERVED_INPUT.width):
        raise EngineError(f"{repo}: the image processor resizes to {dict(size)}; svd maps exactly only to 224x224")
    resample = _PIL_FILTERS.get(int(getattr(processor, "resample", 2)))
    if resample is None or resample not in RESAMPLES:
        raise EngineError(f"{repo}: resampling filter {processor.resample!r} is not bilinear or bicubic")
    if getattr(processor, "do_rescale", True) and abs(float(processor.rescale_factor) - 1 / 255) > 1e-9:
        raise EngineError(f"{repo}: rescale factor {processor.rescale_factor} is not 1/255")
    normalise = getattr(processor, "do_normalize", True)
    mean = [float(v) for v in processor.image_mean] if normalise else [0.0, 0.0, 0.0]
    std = [float(v) for v in processor.image_std] if normalise else [1.0, 1.0, 1.0]
    # The pipeline decodes the whole image: so does this engine (draft off), pixel for pixel.
    return Preprocess("squash", resample, draft=False), mean, std


def _get(size: Any, key: str) -> int | None:
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value is not None else None


def classifier_head(weight: torch.Tensor, bias: torch.Tensor, pos: int, neg: int, features: int) -> Head:
    """The classifier's two-label softmax as one linear member head over (CLS, patch mean) features."""
    hidden = int(weight.shape[1])
    if features != 2 * hidden:
        raise EngineError(f"classifier reads {hidden} features, the backbone gives {features}")
    head = Head(features, hidden=0)
    member = head.members[0]
    assert isinstance(member, LinearMemberHead)
    with torch.no_grad():
        member.linear.weight.zero_()
        member.linear.weight[0, :hidden] = weight[pos] - weight[neg]
        member.linear.bias.fill_(float(bias[pos] - bias[neg]))
        head.fusion.weight.fill_(1.0)
        head.fusion.bias.zero_()
    return head.eval()
