"""A Hugging Face ViT image classifier imported as an engine: the same probabilities as its pipeline."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from svd.engine.canary import street_jpegs
from svd.engine.classifier import import_classifier, positive_index
from svd.engine.load import load_engine
from svd.engine.manifest import EngineError, verify_engine_dir
from svd.engine.model import tiny_vit_config
from svd.engine.preprocess import Preprocess
from svd.serve.decode import DecodeLimits, decode

# A random classifier with an opinion: its logits spread, away from both 0.5 and saturation.
SCALE = 3.0
LIMITS = DecodeLimits(16_000_000, 25_000_000, ("JPEG", "PNG", "WEBP"))


def tiny_classifier(folder: Path, labels: dict[int, str] | None = None, resample: int = 2, seed: int = 0) -> Path:
    """A random tiny ViTForImageClassification and its image processor, saved as a hub repo would be."""
    from transformers import ViTForImageClassification
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    config = tiny_vit_config(hidden_size=32, num_layers=2, num_heads=2)
    config.id2label = labels or {0: "None", 1: "Roadwork"}
    config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(SCALE)
    model.save_pretrained(folder)
    ViTImageProcessorPil(resample=resample, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(
        folder
    )
    return folder


def images() -> list[bytes]:
    out = list(street_jpegs(2, seed=4, size=(1920, 1080))) + list(street_jpegs(1, seed=5, size=(1080, 1920)))
    png = io.BytesIO()
    Image.open(io.BytesIO(street_jpegs(1, seed=6, size=(640, 480))[0])).save(png, format="PNG")
    return [*out, png.getvalue()]


@pytest.mark.parametrize("resample", [2, 3], ids=["bilinear", "bicubic"])
def test_imported_classifier_gives_the_pipeline_s_probabilities(tmp_path: Path, resample: int) -> None:
    from transformers import pipeline

    repo = tiny_classifier(tmp_path / "repo", resample=resample)
    path = import_classifier(str(repo), tmp_path / "engines", "ref")
    manifest = verify_engine_dir(path)
    assert manifest.preprocess == Preprocess("squash", "bilinear" if resample == 2 else "bicubic", draft=False)
    assert manifest.members[0].family == "vit" and manifest.head_trained
    classify = pipeline("image-classification", model=str(repo))
    engine = load_engine(path, backend="onnx")
    seen: list[float] = []
    try:
        for blob in images():
            # The daemon's own decode, with the mapping the manifest recorded.
            pixels = decode(base64.b64encode(blob).decode(), LIMITS, manifest.preprocess).pixels
            ours = float(engine.infer(pixels[None]).probs[0])
            scores = {r["label"]: r["score"] for r in classify(Image.open(io.BytesIO(blob)), top_k=2)}
            assert ours == pytest.approx(scores["Roadwork"], abs=2e-4), (ours, scores)
            seen.append(ours)
        assert max(seen) - min(seen) > 0.01  # the comparison is not between constants
    finally:
        engine.close()


def test_the_positive_label_is_found_or_named(tmp_path: Path) -> None:
    assert positive_index({0: "None", 1: "Roadwork"}, None, "r") == (1, 0)
    assert positive_index({0: "roadwork_present", 1: "clear"}, None, "r") == (0, 1)
    assert positive_index({0: "yes", 1: "no"}, "YES", "r") == (0, 1)
    with pytest.raises(EngineError, match="name it with --positive-label"):
        positive_index({0: "yes", 1: "no"}, None, "r")
    with pytest.raises(EngineError, match="only two-label classifiers"):
        positive_index({0: "a", 1: "b", 2: "roadwork"}, None, "r")
    repo = tiny_classifier(tmp_path / "three", labels={0: "a", 1: "b", 2: "Roadwork"})
    with pytest.raises(EngineError, match="3 labels"):
        import_classifier(str(repo), tmp_path / "engines", "three")
    assert not (tmp_path / "engines" / "three").exists()


def test_a_classifier_that_is_not_there_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(EngineError, match=r"(?s)cannot load the classifier.*hf auth login"):
        import_classifier("natix-network-org/roadwork", tmp_path / "engines", "ref")
    assert not (tmp_path / "engines" / "ref").exists()
