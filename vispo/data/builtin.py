"""Built-in data sets that need no download: easy-vqa (a real VQA set shipped as a package) and the
seeded synthetic generator (:mod:`vispo.data.synthetic`).

easy-vqa's train split is cut in two: a fixed validation split of whole images
(:func:`easy_vqa_validation_images`, about 1,000 questions, split name ``validation``) and the
rest, which is what split ``train`` returns. Training never sees a validation image or question.

easy-vqa has a strong text prior: answering each question string with its most frequent training
answer scores 67.0% on the test split. Each easy-vqa sample therefore carries
``meta["vision_dependent"]``: True when that prior gets it wrong, i.e. when the image is needed.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from vispo.data.sample import Sample, SampleDataset
from vispo.data.synthetic import SYNTHETIC_TASKS, synthetic_vqa

_EASY_VQA_SPLITS = ("train", "validation", "test")

#: The validation split of easy-vqa: images of the package's train split drawn in the order of
#: ``numpy.random.default_rng(EASY_VQA_VALIDATION_SEED).permutation`` of the sorted image ids
#: until their questions number at least :data:`EASY_VQA_VALIDATION_QUESTIONS`.
EASY_VQA_VALIDATION_SEED = 0
EASY_VQA_VALIDATION_QUESTIONS = 1000
_YES_NO = {"yes", "no"}
_SHAPES = {"circle", "rectangle", "triangle"}


@functools.lru_cache(maxsize=2)
def _easy_vqa_raw(split: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[int, ...], dict]:
    """(questions, answers, image ids, image id -> path) of one split, read once per process."""
    import easy_vqa as ev

    if split == "train":
        texts, answers, image_ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    else:
        texts, answers, image_ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    return tuple(texts), tuple(answers), tuple(image_ids), dict(paths)


@functools.lru_cache(maxsize=1)
def easy_vqa_validation_images() -> frozenset[int]:
    """Image ids (of the package's train split) held out as easy-vqa's validation split.

    Whole images are held out (an easy-vqa image has about ten questions), so no training
    question shares an image with a validation question. Fixed: it depends only on the
    package's data and :data:`EASY_VQA_VALIDATION_SEED`.
    """
    import numpy as np

    _, _, image_ids, _ = _easy_vqa_raw("train")
    per_image = Counter(image_ids)
    order = np.random.default_rng(EASY_VQA_VALIDATION_SEED).permutation(sorted(per_image))
    chosen: list[int] = []
    count = 0
    for image_id in order:
        if count >= EASY_VQA_VALIDATION_QUESTIONS:
            break
        chosen.append(int(image_id))
        count += per_image[int(image_id)]
    return frozenset(chosen)


def _question_type(answer: str) -> str:
    """easy-vqa's three question kinds, told apart by the answer vocabulary."""
    if answer in _YES_NO:
        return "yes_no"
    if answer in _SHAPES:
        return "shape"
    return "color"


def _prior_from_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Most frequent answer per question; ties go to the answer seen first (data order)."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for question, answer in pairs:
        counts[question][answer] += 1
    # Counter.most_common is stable: equal counts keep first-insertion order.
    return {q: c.most_common(1)[0][0] for q, c in counts.items()}


def text_prior(samples_train: Iterable[Sample]) -> dict[str, str]:
    """The text-only baseline: question string -> its most frequent answer in ``samples_train``.

    Ties are broken by first occurrence in ``samples_train`` (deterministic for a fixed order;
    on easy-vqa this reproduces the 67.0% test accuracy quoted in the design notes).
    """
    return _prior_from_pairs((s.question, s.answer) for s in samples_train)


def _norm(text: str) -> str:
    return text.strip().lower()


def text_prior_accuracy(prior: dict[str, str], samples: Iterable[Sample]) -> float:
    """Fraction of ``samples`` that the prior answers correctly (unseen questions count wrong)."""
    total = correct = 0
    for s in samples:
        total += 1
        guess = prior.get(s.question)
        correct += guess is not None and _norm(guess) == _norm(s.answer)
    if total == 0:
        raise ValueError("text_prior_accuracy: no samples")
    return correct / total


@functools.lru_cache(maxsize=1)
def _easy_vqa_train_prior() -> dict[str, str]:
    """The text prior of the package's whole train split (validation images included): it
    defines ``meta["vision_dependent"]`` on every split, so the ``-vd`` subsets and the 67.0%
    figure do not depend on the validation cut. Without the validation images exactly one
    question string changes its most frequent answer ("what shape is present?": rectangle ->
    circle; test accuracy of that prior 66.9%)."""
    texts, answers, _, _ = _easy_vqa_raw("train")
    return _prior_from_pairs(zip(texts, answers, strict=True))


def easy_vqa(split: str = "train", limit: int | None = None) -> SampleDataset:
    """The easy-vqa questions of ``split``, in the package's order.

    ``train``: the package's train split (38,575 questions, 4,000 images) less the images of
    the ``validation`` split (:func:`easy_vqa_validation_images`: 1,005 questions of 107
    images), 37,570 questions; ``test``: the package's test split (9,673). Sample ids are
    ``easy-vqa/<split>/<row>``, ``<row>`` the question's row in the package's file (train and
    validation rows both number the package's train file). Each sample has one 64x64 PNG path
    as image and meta ``question_type`` (``yes_no``, ``shape`` or ``color``),
    ``vision_dependent`` (the text prior of the package's train split answers it wrongly),
    ``task="easy-vqa"``, ``split`` and ``image_id``.
    """
    if split not in _EASY_VQA_SPLITS:
        raise ValueError(f"easy_vqa: split must be one of {_EASY_VQA_SPLITS}, got {split!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"easy_vqa: limit must be a non-negative int or None, got {limit!r}")
    texts, answers, image_ids, paths = _easy_vqa_raw("test" if split == "test" else "train")
    prior = _easy_vqa_train_prior()
    if split == "test":
        rows: Iterable[int] = range(len(texts))
    else:
        held = easy_vqa_validation_images()
        want = split == "validation"
        rows = [i for i, image_id in enumerate(image_ids) if (image_id in held) == want]
    samples = []
    for i in rows:
        if limit is not None and len(samples) >= limit:
            break
        question, answer, image_id = texts[i], answers[i], image_ids[i]
        samples.append(
            Sample(
                id=f"easy-vqa/{split}/{i}",
                images=[paths[image_id]],
                question=question,
                answer=answer,
                meta={
                    "task": "easy-vqa",
                    "split": split,
                    "question_type": _question_type(answer),
                    "vision_dependent": prior.get(question) != answer,
                    "image_id": image_id,
                },
            )
        )
    return SampleDataset(samples, source="easy-vqa", split=split)


def _synthetic_builtin(
    split: str = "train", limit: int | None = None, *, n: int | None = None, **kwargs
) -> SampleDataset:
    """Registry adapter: ``n`` defaults to 2,000 (train) / 500 (other splits); ``limit`` caps it."""
    size = n if n is not None else (2000 if split == "train" else 500)
    if limit is not None:
        size = min(size, limit)
    return synthetic_vqa(size, split=split, **kwargs)


#: Built-in data sets by name, each ``fn(split="train", limit=None, **options) -> SampleDataset``.
BUILTIN_DATASETS: dict[str, Callable[..., SampleDataset]] = {
    "easy-vqa": easy_vqa,
    "synthetic": _synthetic_builtin,
}


def load_builtin(name: str, split: str = "train", limit: int | None = None, **options):
    """Load a built-in data set by name (``easy-vqa``/``easy_vqa``, ``synthetic``)."""
    key = name.strip().lower().replace("_", "-")
    if key not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in data set {name!r}; known: {sorted(BUILTIN_DATASETS)}")
    return BUILTIN_DATASETS[key](split=split, limit=limit, **options)


__all__ = [
    "BUILTIN_DATASETS",
    "EASY_VQA_VALIDATION_QUESTIONS",
    "EASY_VQA_VALIDATION_SEED",
    "SYNTHETIC_TASKS",
    "easy_vqa",
    "easy_vqa_validation_images",
    "load_builtin",
    "synthetic_vqa",
    "text_prior",
    "text_prior_accuracy",
]
