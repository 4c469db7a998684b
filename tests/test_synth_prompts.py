"""The prompt rules: validators' sentence, exactly one roadwork element for label 1, none for label 0,
within the text encoders' token limit, the element never cut off."""

from __future__ import annotations

import random

import pytest

from svd.train.synth import prompts
from svd.train.synth.diffusion import tiny_tokenizer

# Captions as NATIX's scene_description reads, several naming roadwork more than once.
CAPTIONS = [
    "Road work zone with orange cones, barriers and workers in safety vests; lane closed ahead on a busy "
    "city street with tall buildings and many cars parked along both sides of the road under a grey sky",
    "The image shows a construction crew repairing the asphalt while traffic passes on a two-lane road.",
    "A highway with an excavator on the shoulder and a detour sign.",
    "cones",
    "",
    None,
    "A quiet residential street lined with trees and parked cars on a sunny day",
]


def element_words(element: str) -> list[str]:
    return prompts.roadwork_words(element)


@pytest.mark.parametrize("caption", CAPTIONS)
def test_label_1_names_exactly_one_element_and_no_other_roadwork(caption: str | None) -> None:
    rng = random.Random(3)
    for _ in range(50):
        p = prompts.make_prompt(1, rng, caption)
        assert p.text.startswith(prompts.PREFIX) and p.text.endswith(".")
        assert p.element in prompts.ELEMENTS
        assert prompts.elements_named(p.text) == [p.element]
        # Every roadwork word in the prompt is the element's own (no cones beside a worker).
        assert sorted(prompts.roadwork_words(p.text)) == sorted(element_words(p.element)), p.text


@pytest.mark.parametrize("caption", CAPTIONS)
def test_label_0_names_no_roadwork(caption: str | None) -> None:
    rng = random.Random(4)
    for _ in range(50):
        p = prompts.make_prompt(0, rng, caption)
        assert p.text.startswith(prompts.PREFIX + " of ")
        assert p.element is None and prompts.elements_named(p.text) == []
        assert prompts.roadwork_words(p.text) == [], p.text
        assert prompts.NO_ROADWORK in p.text


def test_a_caption_keeps_its_scene_without_the_roadwork_clauses() -> None:
    scene = prompts.scene_from_caption(CAPTIONS[0])
    assert scene and prompts.roadwork_words(scene) == []
    assert scene.startswith("tall buildings, many cars parked"), scene
    assert len(scene.split()) <= prompts.SCENE_WORDS
    p = prompts.make_prompt(1, random.Random(0), CAPTIONS[0])
    assert p.scene_from == "caption"
    # Too little left after the rules: a template scene instead.
    assert prompts.scene_from_caption("cones") == ""
    assert prompts.make_prompt(1, random.Random(0), "cones").scene_from == "template"
    assert prompts.scene_from_caption("The image shows a quiet residential street").startswith("a quiet")


def test_prompts_fit_the_token_limit_of_a_clip_tokenizer_and_keep_the_element() -> None:
    tok = tiny_tokenizer()  # CLIP's tokenizer class; common words whole, others byte by byte
    count, limit = prompts.tokenizer_count([tok])
    assert limit == 77
    rng = random.Random(5)
    long_caption = "A very wide boulevard " + "with unusually extraordinary architecture " * 20
    for caption in [*CAPTIONS, long_caption]:
        for label in (0, 1):
            p = prompts.make_prompt(label, rng, caption, count, limit)
            assert count(p.text) <= limit, (count(p.text), p.text)
            if label == 1:
                assert prompts.elements_named(p.text) == [p.element]


def test_a_tight_limit_drops_scene_words_never_the_element() -> None:
    count = prompts.approximate_tokens
    caption = "A quiet residential street lined with trees and parked cars on a sunny day"
    roomy = prompts.make_prompt(1, random.Random(1), caption, count, 77)
    tight = prompts.make_prompt(1, random.Random(1), caption, count, 24)
    assert count(tight.text) <= 24 < count(roomy.text)
    assert tight.element == roomy.element and prompts.elements_named(tight.text) == [tight.element]
    assert len(tight.text) < len(roomy.text)
    # Nothing of the scene fits: the bare prefix and element.
    bare = prompts.make_prompt(1, random.Random(1), caption, count, 14)
    assert bare.text == f"{prompts.PREFIX}, {bare.element}."


def test_approximate_tokens_is_not_below_the_clip_tokenizers_count_for_prompts() -> None:
    tok = tiny_tokenizer()
    count, _ = prompts.tokenizer_count([tok])
    rng = random.Random(2)
    for _ in range(100):
        p = prompts.make_prompt(rng.randrange(2), rng)
        assert prompts.approximate_tokens(p.text) >= count(p.text), p.text


def test_a_bad_label_is_refused() -> None:
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        prompts.make_prompt(2, random.Random(0))
