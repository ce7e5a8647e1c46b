"""``easy-vqa-cf``: easy-vqa-style questions whose image contradicts the text prior.

For every question string of easy-vqa's train split, :func:`easy_vqa_counterfactual` draws
images, in easy-vqa's style, on which the true answer differs from that string's text prior
(its most frequent training answer). A model that answers from the question text alone scores
0 here; only looking at the image helps.

The images copy what easy-vqa's own images show: a 64x64 RGB canvas of one light colour (each
channel uniform in 230..255) with one anti-aliased filled shape (circle, axis-aligned rectangle
or upward triangle, 9 to 34 px across) in one of easy-vqa's eight colours (their exact RGB
values, read off the package's images). Shapes are drawn at 4x and reduced with a box filter,
which gives the same one-pixel soft edge.

The prior avoided is the one of the package's whole train split and, where it differs, the
one of vispo's training split (train less the validation images: :func:`easy_vqa`); only
"what shape is present?" differs, so its counterfactual shape is neither. Everything is drawn
from ``numpy.random.default_rng(CF_SEED)``: the set is the same in every process.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from vispo.data.sample import Sample, SampleDataset

#: easy-vqa's colours, as the package's images draw them.
EASY_VQA_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
EASY_VQA_SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")

CF_SEED = 0
#: Items drawn per question string (107 strings -> 856 questions).
CF_PER_QUESTION = 8
CANVAS = 64
_SCALE = 4
_MIN_SIZE, _MAX_SIZE = 9, 34


def parse_question(question: str) -> tuple[str, str | None, bool]:
    """``(kind, word, negated)`` of an easy-vqa question string.

    ``kind`` is ``"color"`` (answer: a colour; ``word`` the shape named, if any), ``"shape"``
    (answer: a shape; ``word`` the colour named, if any) or ``"yes_no"`` (``word`` the colour
    or shape asked about; ``negated`` for "is there not ...", "is no ... present", "does the
    image not contain ...").
    """
    words = question.strip().lower().rstrip("?").split()
    color = next((w for w in words if w in EASY_VQA_COLORS), None)
    shape = next((w for w in words if w in EASY_VQA_SHAPES), None)
    if words and words[0] == "what":
        if "color" in words:
            return "color", shape, False
        return "shape", color, False
    word = color or shape
    if word is None:
        raise ValueError(f"not an easy-vqa question: {question!r}")
    return "yes_no", word, ("not" in words or "no" in words)


def _answer(kind: str, word: str | None, negated: bool, color: str, shape: str) -> str:
    """The true answer of a question on an image of one ``color`` ``shape``."""
    if kind == "color":
        return color
    if kind == "shape":
        return shape
    present = word in (color, shape)
    return "yes" if present != negated else "no"


def _pick(rng: np.random.Generator, options) -> str:
    options = sorted(options)
    return options[int(rng.integers(len(options)))]


def _choose(
    rng: np.random.Generator, kind: str, word: str | None, negated: bool, avoid: set[str]
) -> tuple[str, str] | None:
    """A (colour, shape) whose answer to the question is not in ``avoid``; None if none."""
    colors, shapes = set(EASY_VQA_COLORS), set(EASY_VQA_SHAPES)
    if kind == "color":
        allowed = colors - avoid
        if not allowed:
            return None
        return _pick(rng, allowed), word or _pick(rng, shapes)
    if kind == "shape":
        allowed = shapes - avoid
        if not allowed:
            return None
        return word or _pick(rng, colors), _pick(rng, allowed)
    answers = {"yes", "no"} - avoid
    if not answers:
        return None
    present = (_pick(rng, answers) == "yes") != negated
    if word in colors:
        color = word if present else _pick(rng, colors - {word})
        return color, _pick(rng, shapes)
    shape = word if present else _pick(rng, shapes - {word})
    return _pick(rng, colors), shape


def draw_shape(rng: np.random.Generator, color: str, shape: str) -> Image.Image:
    """One easy-vqa-style image: a light background and one ``color`` ``shape``."""
    background = tuple(int(v) for v in rng.integers(230, 256, size=3))
    big = Image.new("RGB", (CANVAS * _SCALE, CANVAS * _SCALE), background)
    draw = ImageDraw.Draw(big)
    fill = EASY_VQA_COLORS[color]
    w = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
    h = w if shape == "circle" else int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
    if shape == "triangle":
        h = max(_MIN_SIZE, round(w * 0.87))  # near-equilateral, as easy-vqa draws them
    x0 = int(rng.integers(0, CANVAS - w + 1))
    y0 = int(rng.integers(0, CANVAS - h + 1))
    box = [x0 * _SCALE, y0 * _SCALE, (x0 + w) * _SCALE - 1, (y0 + h) * _SCALE - 1]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        left, top, right, bottom = box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=fill)
    return big.resize((CANVAS, CANVAS), Image.Resampling.BOX)


def _type_of(kind: str) -> str:
    return "yes_no" if kind == "yes_no" else kind


@functools.lru_cache(maxsize=1)
def easy_vqa_priors() -> tuple[dict[str, str], dict[str, str]]:
    """(prior of the package's train split, prior of vispo's ``train`` split)."""
    from vispo.data.builtin import _easy_vqa_train_prior, easy_vqa, text_prior

    return dict(_easy_vqa_train_prior()), text_prior(easy_vqa("train"))


@functools.lru_cache(maxsize=1)
def _cf_samples() -> tuple[Sample, ...]:
    full, train = easy_vqa_priors()
    questions = sorted(full)
    rng = np.random.default_rng(CF_SEED)
    samples = []
    for _ in range(CF_PER_QUESTION):
        for question in questions:
            kind, word, negated = parse_question(question)
            avoid = {full[question], train.get(question, full[question])}
            chosen = _choose(rng, kind, word, negated, avoid)
            if chosen is None:
                continue
            color, shape = chosen
            image = draw_shape(rng, color, shape)
            answer = _answer(kind, word, negated, color, shape)
            samples.append(
                Sample(
                    id=f"easy-vqa-cf/{len(samples)}",
                    images=[image],
                    question=question,
                    answer=answer,
                    meta={
                        "task": "easy-vqa-cf",
                        "split": "test",
                        "question_type": _type_of(kind),
                        "vision_dependent": True,
                        "text_prior": full[question],
                        "drawn": f"{color} {shape}",
                    },
                )
            )
    return tuple(samples)


def easy_vqa_counterfactual(limit: int | None = None) -> SampleDataset:
    """The counterfactual set (856 questions: 8 per easy-vqa question string, round-robin
    over the sorted strings, so any prefix mixes them); ``limit`` keeps the first ones.

    Each sample's image is a PIL image; meta ``text_prior`` (the avoided answer), ``drawn``
    (``"<colour> <shape>"``), ``question_type`` and ``vision_dependent=True``.
    """
    samples = list(_cf_samples())
    if limit is not None:
        samples = samples[:limit]
    return SampleDataset(samples, source="easy-vqa-cf", split="test")


__all__ = [
    "CF_PER_QUESTION",
    "CF_SEED",
    "EASY_VQA_COLORS",
    "EASY_VQA_SHAPES",
    "draw_shape",
    "easy_vqa_counterfactual",
    "parse_question",
]
