"""Prompts for synthetic challenges, the validators' recipe by rules instead of a language model.

Validators (protocol.md, "The validator of today") caption a real image of the
wanted label with BLIP-2 and have an LLM rewrite the caption into one sentence
starting "Photorealistic dashcam footage"; for label 1 it names exactly one of
five roadwork elements, for label 0 none. Here the caption is the source row's
`scene_description` where there is one, else a scene drawn from templates, and
the rewrite is by rules:

1. every clause of the caption naming roadwork (cones, barriers, workers,
   construction...) is dropped, so that label 1 names exactly one element, the
   one we add, and label 0 none; the rest is cut to SCENE_WORDS words;
2. the sentence is "Photorealistic dashcam footage of <scene>, with <element>
   <where>." for label 1 and "... of <scene>, clear road and regular traffic."
   for label 0 (the validators' LLM is told to "focus on clear roads and
   regular traffic");
3. it must fit the text encoders (77 tokens with the start and end tokens):
   scene words are dropped from the end until it does, so the element, which
   carries the label, is never cut off the way the pipeline's own truncation
   would cut the end of a sentence.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

PREFIX = "Photorealistic dashcam footage"
# The five single roadwork elements of today's validators, verbatim.
ELEMENTS = (
    "a single orange traffic cone",
    "one worker in a safety vest",
    "a parked construction vehicle",
    "a temporary roadwork sign",
    "a small barrier",
)
WHERE = ("on the right side of the road", "ahead on the shoulder", "near the curb", "at the edge of the lane")
NO_ROADWORK = "clear road and regular traffic"
# Words that make a clause about roadwork: such clauses leave the caption (rule 1), and a prompt for
# label 0 may hold none of them, one for label 1 only its element's.
ROADWORK_WORDS = frozenset(
    {
        *("cone", "cones", "barrier", "barriers", "barricade", "barricades", "pylon", "pylons", "sign", "signs"),
        *("worker", "workers", "crew", "crews", "vest", "vests", "hardhat", "hardhats", "helmet", "helmets"),
        *("construction", "roadwork", "roadworks", "maintenance", "repair", "repairs", "repairing", "paving"),
        *("excavator", "excavators", "bulldozer", "digger", "crane", "machinery", "equipment", "jackhammer"),
        *("scaffolding", "detour", "closure", "closed", "asphalt", "hazard", "trench", "work", "works", "zone"),
        *("barrel", "barrels", "bollard", "bollards", "drum", "drums", "roadblock", "roadblocks"),
        *("flagger", "flaggers", "workman", "workmen"),
    }
)
# The scenes label-0 rows (which carry no description) and bare captions start from.
ROADS = (
    "a two-lane city street",
    "a suburban residential road",
    "a multi-lane highway",
    "a rural road between fields",
    "a downtown intersection",
    "a narrow street lined with parked cars",
    "a road over a river bridge",
    "a tree-lined avenue",
    "a highway exit ramp",
    "a quiet street in a small town",
)
LIGHT = (
    "on a sunny afternoon",
    "under an overcast sky",
    "at dusk",
    "after light rain",
    "in early morning light",
    "at noon",
)
TRAFFIC = ("with light traffic", "with a few cars ahead", "with a bus in the next lane", "with cyclists nearby", "")
SCENE_WORDS = 14
# CLIP's text encoders take 77 tokens, the start and end tokens among them.
MAX_TOKENS = 77
# What a caption's opening often says about the photo rather than the scene.
_OPENINGS = re.compile(
    r"^(?:(?:the|this|an?)\s+)?(?:image|photo|picture|view|dashcam\s+(?:image|view|footage))\s+"
    r"(?:shows|of|depicts|showing|with)\s+",
    re.IGNORECASE,
)
_CLAUSES = re.compile(r"[.;:!?]|,|\bwhile\b|\bwhere\b|\bwith\b|\band\b", re.IGNORECASE)

TokenCount = Callable[[str], int]


@dataclass(frozen=True)
class Prompt:
    text: str
    label: int
    # The roadwork element it names (label 1), else None.
    element: str | None
    # Where the scene came from: "caption" (the source row's) or "template".
    scene_from: str


def words_of(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def roadwork_words(text: str) -> list[str]:
    """The roadwork words in text (rule 1's vocabulary), in order."""
    return [w for w in words_of(text) if w in ROADWORK_WORDS]


def elements_named(text: str) -> list[str]:
    """Which of the five elements text names, verbatim."""
    low = text.lower()
    return [e for e in ELEMENTS if e in low]


def scene_from_caption(caption: str | None) -> str:
    """Rule 1: the caption's clauses that name no roadwork, opening words dropped, at most SCENE_WORDS
    words, lower case; "" when nothing is left."""
    if not caption:
        return ""
    text = _OPENINGS.sub("", caption.strip())
    kept = [c.strip() for c in _CLAUSES.split(text) if c.strip() and not roadwork_words(c)]
    words = ", ".join(kept).split()[:SCENE_WORDS]
    scene = " ".join(words).strip(" ,.-").lower()
    # A scene of fewer than three words says too little to steer the image: templates do better.
    return scene if len(scene.split()) >= 3 else ""


def template_scene(rng: random.Random) -> str:
    parts = [rng.choice(ROADS), rng.choice(LIGHT), rng.choice(TRAFFIC)]
    return " ".join(p for p in parts if p)


def approximate_tokens(text: str) -> int:
    """A stand-in for a CLIP tokenizer where none is loaded: a word or a punctuation mark is one token,
    a long word two (CLIP's BPE keeps common English words whole), plus the start and end tokens."""
    pieces = re.findall(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]", text)
    return 2 + sum(2 if len(p) > 10 else 1 for p in pieces)


def make_prompt(
    label: int,
    rng: random.Random,
    caption: str | None = None,
    count: TokenCount = approximate_tokens,
    max_tokens: int = MAX_TOKENS,
) -> Prompt:
    """One prompt for an image of `label`, from the source's caption where it has a usable one.

    Args:
        count: tokens of a text as the pipeline's text encoders see it, start and end tokens included.
    """
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label!r}")
    scene = scene_from_caption(caption)
    scene_from = "caption" if scene else "template"
    scene = scene or template_scene(rng)
    element = rng.choice(ELEMENTS) if label == 1 else None
    tail = f"with {element} {rng.choice(WHERE)}" if element else NO_ROADWORK
    words = scene.split()
    while True:  # rule 3: drop scene words from the end until it fits; the tail is never cut
        text = f"{PREFIX} of {' '.join(words) or 'a road'}, {tail}."
        if count(text) <= max_tokens or not words:
            break
        words.pop()
    if count(text) > max_tokens and element is not None:
        text = f"{PREFIX}, {element}."
    return Prompt(text, label, element, scene_from)


def tokenizer_count(tokenizers: list[object]) -> tuple[TokenCount, int]:
    """The token count of the pipeline's tightest tokenizer, and its limit (start and end included)."""
    best = min(tokenizers, key=lambda t: int(getattr(t, "model_max_length", MAX_TOKENS)))
    limit = int(getattr(best, "model_max_length", MAX_TOKENS))

    def count(text: str) -> int:
        return len(best(text, truncation=False)["input_ids"])  # type: ignore[operator]

    return count, min(limit, MAX_TOKENS)
