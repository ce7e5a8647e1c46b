"""easy-vqa's validation split (whole train images held out) and the counterfactual set."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vispo.data import easy_vqa, text_prior
from vispo.data.builtin import EASY_VQA_VALIDATION_QUESTIONS, easy_vqa_validation_images
from vispo.data.counterfactual import (
    EASY_VQA_COLORS,
    draw_shape,
    easy_vqa_counterfactual,
    parse_question,
)
from vispo.eval.benchmarks import BENCHMARKS, VISION_DEPENDENT
from vispo.train.config import DataConfig
from vispo.train.setup import held_out, load_split


@pytest.fixture(scope="module")
def package_train():
    """The package's train file, read directly (independent of vispo's loader)."""
    import easy_vqa as ev

    root = Path(ev.__file__).parent / "data"
    return json.loads((root / "train" / "questions.json").read_text())


@pytest.fixture(scope="module")
def val_train():
    return easy_vqa("validation"), easy_vqa("train")


def test_validation_is_disjoint_from_training_by_image_and_row(package_train, val_train):
    val, train = val_train
    val_images = {s.meta["image_id"] for s in val}
    train_images = {s.meta["image_id"] for s in train}
    assert not val_images & train_images
    rows_val = {int(s.id.rsplit("/", 1)[1]) for s in val}
    rows_train = {int(s.id.rsplit("/", 1)[1]) for s in train}
    assert not rows_val & rows_train
    assert rows_val | rows_train == set(range(len(package_train)))
    # Whole images: every question of a held-out image is in validation.
    by_image = Counter(image_id for _, _, image_id in package_train)
    assert len(val) == sum(by_image[i] for i in val_images)
    assert {s.images[0] for s in val}.isdisjoint({s.images[0] for s in train})
    for s in val:
        q, a, image_id = package_train[int(s.id.rsplit("/", 1)[1])]
        assert (s.question, s.answer, s.meta["image_id"]) == (q, a, image_id)
        assert s.meta["split"] == "validation" and s.id.startswith("easy-vqa/validation/")


def test_validation_size_and_determinism(package_train, val_train):
    val, _ = val_train
    most = max(Counter(i for _, _, i in package_train).values())
    assert EASY_VQA_VALIDATION_QUESTIONS <= len(val) < EASY_VQA_VALIDATION_QUESTIONS + most
    assert (len(val), len(easy_vqa_validation_images())) == (1005, 107)
    # Same selection from scratch (the cache cleared) and by an independent re-derivation:
    # image ids in the order of default_rng(0).permutation(sorted ids) until >= 1,000 q.
    easy_vqa_validation_images.cache_clear()
    again = easy_vqa("validation")
    assert [s.id for s in again] == [s.id for s in val]
    counts = Counter(i for _, _, i in package_train)
    order = np.random.default_rng(0).permutation(sorted(counts))
    chosen, n = set(), 0
    for i in order:
        if n >= 1000:
            break
        chosen.add(int(i))
        n += counts[int(i)]
    assert chosen == easy_vqa_validation_images()
    assert len(easy_vqa("validation", limit=10)) == 10


def test_training_loader_excludes_validation_whatever_the_eval_split(val_train):
    val, _ = val_train
    val_ids = {s.id.replace("validation", "train") for s in val}
    for eval_split in ("test", "validation"):
        dcfg = DataConfig(name="easy-vqa", eval_split=eval_split, eval_size=50)
        train = load_split(dcfg, dcfg.split, None)
        assert len(train) == 37_570
        assert not val_ids & {s.id for s in train}
        assert not {s.meta["image_id"] for s in val} & {s.meta["image_id"] for s in train}
        held, keep = held_out(dcfg, train)
        assert keep is None and len(held) == 50
        assert {s.meta["split"] for s in held} == {eval_split}
    bench = BENCHMARKS["easy-vqa-val"].load()
    assert [s.id for s in bench] == [s.id for s in val]


# -- the counterfactual set -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cf():
    return easy_vqa_counterfactual()


def _priors(package_train):
    """Both priors, computed here from the raw rows: the package's whole train split, and
    vispo's train split (validation images removed)."""
    from vispo.data import Sample

    held = easy_vqa_validation_images()
    rows = [Sample(id=str(k), question=q, answer=a) for k, (q, a, _) in enumerate(package_train)]
    kept = [r for r, (_, _, i) in zip(rows, package_train) if i not in held]
    return text_prior(rows), text_prior(kept)


def test_counterfactual_contradicts_the_prior(cf, package_train):
    full, train = _priors(package_train)
    assert len(cf) == 856 and len({s.id for s in cf}) == 856
    assert {s.question for s in cf} == set(full)  # every question string, 8 times
    assert set(Counter(s.question for s in cf).values()) == {8}
    assert all(s.answer != full[s.question] for s in cf)
    assert all(s.answer != train[s.question] for s in cf)
    # A model that answers with the prior (either one) scores 0.
    assert sum(full[s.question] == s.answer for s in cf) == 0
    assert sum(train[s.question] == s.answer for s in cf) == 0
    assert BENCHMARKS["easy-vqa-cf"].group == VISION_DEPENDENT
    assert [s.id for s in BENCHMARKS["easy-vqa-cf"].load(limit=20)] == [s.id for s in cf[:20]]
    kinds = Counter(s.meta["question_type"] for s in cf)
    assert kinds == {"yes_no": 704, "shape": 88, "color": 64}


def _read_image(img) -> tuple[str, str]:
    """(colour, shape) read off the pixels: an independent route to the answer. The colour is
    the exact easy-vqa RGB value that covers most pixels apart from the background (the corner
    colour); the shape follows from how much of its bounding box the shape fills (rectangle 1,
    circle pi/4, triangle 1/2)."""
    a = np.asarray(img).astype(int)
    background = a[0, 0]
    counts = Counter(map(tuple, a.reshape(-1, 3)))
    palette = {rgb: name for name, rgb in EASY_VQA_COLORS.items()}
    color = next(palette[rgb] for rgb, _ in counts.most_common() if rgb in palette)
    mask = np.abs(a - background).sum(-1) > 0
    mask &= np.abs(a - np.array(EASY_VQA_COLORS[color])).sum(-1) < 200
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    shape = "rectangle" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return color, shape


def _true_answer(question: str, color: str, shape: str) -> str:
    q = question.rstrip("?").split()
    if q[0] == "what":
        return color if "color" in q else shape
    present = any(w in (color, shape) for w in q)
    negated = "not" in q or "no" in q
    return "yes" if present != negated else "no"


def test_counterfactual_answers_match_the_drawn_pixels(cf):
    for s in cf:
        (img,) = s.load_images()
        assert img.size == (64, 64) and img.mode == "RGB"
        color, shape = _read_image(img)
        assert f"{color} {shape}" == s.meta["drawn"], s.id
        assert _true_answer(s.question, color, shape) == s.answer, s.id


def test_counterfactual_is_deterministic_and_easy_vqa_styled(cf):
    from vispo.data import counterfactual

    counterfactual._cf_samples.cache_clear()
    again = easy_vqa_counterfactual()
    assert [(s.question, s.answer) for s in again] == [(s.question, s.answer) for s in cf]
    assert all(
        np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
        for a, b in zip(again[:50], cf[:50])
    )
    img = np.asarray(cf[0].images[0]).astype(int)
    assert (img[0, 0] >= 230).all()  # a light background like easy-vqa's (230..255)
    rng = np.random.default_rng(1)
    for shape in ("circle", "rectangle", "triangle"):
        drawn = np.asarray(draw_shape(rng, "teal", shape)).astype(int)
        assert _read_image(drawn) == ("teal", shape)


def test_parse_question():
    assert parse_question("what color is the circle?") == ("color", "circle", False)
    assert parse_question("what is the blue shape?") == ("shape", "blue", False)
    assert parse_question("what shape is present?") == ("shape", None, False)
    assert parse_question("is no rectangle present?") == ("yes_no", "rectangle", True)
    assert parse_question("does the image not contain a red shape?") == ("yes_no", "red", True)
    assert parse_question("is there a gray shape in the image?") == ("yes_no", "gray", False)
    with pytest.raises(ValueError, match="not an easy-vqa question"):
        parse_question("is it raining?")
