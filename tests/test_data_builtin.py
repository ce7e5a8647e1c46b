"""vispo.data.builtin: easy-vqa offline, its text prior, the registry."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from vispo.data import (
    BUILTIN_DATASETS,
    Sample,
    easy_vqa,
    load_builtin,
    text_prior,
    text_prior_accuracy,
)


def _row(sample) -> int:
    return int(sample.id.rsplit("/", 1)[1])


@pytest.fixture(scope="module")
def splits():
    """(the package's whole train split, in its order: vispo's train + validation; test)."""
    package_train = sorted([*easy_vqa("train"), *easy_vqa("validation")], key=_row)
    return package_train, easy_vqa("test")


def test_easy_vqa_counts(splits):
    train, test = splits
    assert (len(train), len(test)) == (38_575, 9_673)
    assert [_row(s) for s in train] == list(range(38_575))
    assert (len(easy_vqa("train")), len(easy_vqa("validation"))) == (37_570, 1_005)
    assert len({s.question for s in train}) == 107
    assert {s.question for s in test} <= {s.question for s in train}
    assert len({s.id for s in train}) == len(train)


def test_easy_vqa_matches_the_package_files(splits):
    """Independent route: read the package's JSON directly."""
    import easy_vqa as ev

    root = Path(ev.__file__).parent / "data"
    raw = json.loads((root / "test" / "questions.json").read_text())
    test = splits[1]
    assert [(s.question, s.answer) for s in test[:50]] == [(q, a) for q, a, _ in raw[:50]]
    image_id = raw[123][2]
    assert test[123].images == [str(root / "test" / "images" / f"{image_id}.png")]
    (img,) = test[123].load_images()
    assert img.mode == "RGB" and img.size == (64, 64)


def test_text_prior_scores_67_percent_on_test(splits):
    train, test = splits
    prior = text_prior(train)
    assert len(prior) == 107
    assert text_prior_accuracy(prior, test) == pytest.approx(0.670, abs=0.001)
    # vision_dependent is exactly "the train prior gets it wrong".
    dependent = sum(s.meta["vision_dependent"] for s in test)
    assert dependent == round((1 - text_prior_accuracy(prior, test)) * len(test))
    assert all(s.meta["vision_dependent"] == (prior[s.question] != s.answer) for s in test)


def test_question_types(splits):
    test = splits[1]
    kinds = Counter(s.meta["question_type"] for s in test)
    assert set(kinds) == {"yes_no", "shape", "color"}
    assert kinds["yes_no"] / len(test) == pytest.approx(0.74, abs=0.005)  # design.md: 74%
    for s in test[:300]:
        expected = {"yes": "yes_no", "no": "yes_no", "circle": "shape", "rectangle": "shape"}.get(
            s.answer, "shape" if s.answer == "triangle" else "color"
        )
        assert s.meta["question_type"] == expected


def test_text_prior_by_hand():
    def s(q, a):
        return Sample(id=q + a, question=q, answer=a)

    train = [s("q1", "a"), s("q1", "b"), s("q1", "b"), s("q2", "x"), s("q2", "y"), s("q3", "z")]
    prior = text_prior(train)
    assert prior == {"q1": "b", "q2": "x", "q3": "z"}  # q2 tie: first seen wins
    test = [s("q1", "b"), s("q1", "a"), s("q2", "X "), s("q4", "z")]
    assert text_prior_accuracy(prior, test) == pytest.approx(2 / 4)  # case/space-insensitive
    with pytest.raises(ValueError, match="no samples"):
        text_prior_accuracy(prior, [])


def test_registry_and_limits():
    assert set(BUILTIN_DATASETS) == {"easy-vqa", "synthetic"}
    small = load_builtin("easy_vqa", split="test", limit=5)
    assert [s.id for s in small] == [f"easy-vqa/test/{i}" for i in range(5)]
    synth = load_builtin("synthetic", split="test", limit=7, seed=3)
    assert len(synth) == 7 and synth[0].meta["split"] == "test"
    assert [s.question for s in synth] == [
        s.question for s in load_builtin("synthetic", split="test", n=7, seed=3)
    ]
    with pytest.raises(ValueError, match=r"unknown built-in data set 'mnist'"):
        load_builtin("mnist")
    with pytest.raises(ValueError, match="split must be one of"):
        easy_vqa("val")
