"""Which image a question is asked with in evaluation: the real one, a uniform gray one, or
another question's.

The drop in accuracy from ``real`` to ``gray`` measures how much a model uses the image (a
uniform gray image carries no information; :func:`vispo.eval.probe.blank_like`, the fill of
``vispo probe``). ``other`` asks each question about a different question's image, chosen by
:func:`derangement`: no question keeps its own image, and wherever the answers allow it the
image comes from a question with a different answer, so that a model that reads the image
answers it wrongly and one that ignores the image answers as with ``real``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import numpy as np

IMAGE_MODES: tuple[str, ...] = ("real", "gray", "other")


def derangement(answers: Sequence[str], seed: int) -> list[int]:
    """``donor[i]``: the question whose image question ``i`` is asked with; ``donor[i] != i``.

    The questions are shuffled with ``seed``, stably sorted by answer (case-insensitive), and
    each takes the image ``m`` places further along that order (cyclically), ``m`` the size of
    the largest group of equal answers (``1`` when every answer is the same). That is a
    derangement for ``n >= 2``; when no answer is shared by more than half of the questions,
    every question gets an image of a question with a different answer, and otherwise the
    number of equal-answer pairs is the least possible, ``2m - n``.
    """
    n = len(answers)
    if n < 2:
        raise ValueError(f"image mode 'other' needs at least 2 questions, got {n}")
    keys = [str(a).strip().lower() for a in answers]
    shuffled = np.random.default_rng(seed).permutation(n)
    order = sorted((int(i) for i in shuffled), key=lambda i: keys[i])
    largest = max(keys.count(k) for k in set(keys))
    shift = largest if largest < n else 1
    donor = [0] * n
    for position, i in enumerate(order):
        donor[i] = order[(position + shift) % n]
    return donor


def donor_seed(seed: int, benchmark: str) -> int:
    """The seed of a benchmark's derangement (stable across runs and processes)."""
    digest = hashlib.sha256(f"{seed}/{benchmark}/other-image".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def with_image(sample, mode: str, donor=None):
    """``sample`` asked with the image of ``mode``: itself (``real``), a uniform gray image of
    the same size per image (``gray``), or ``donor``'s images (``other``)."""
    if mode == "real":
        return sample
    if mode == "gray":
        from vispo.eval.probe import blank_like

        return dataclasses.replace(sample, images=[blank_like(im) for im in sample.load_images()])
    if mode == "other":
        if donor is None:
            raise ValueError("image mode 'other' needs a donor sample")
        return dataclasses.replace(sample, images=list(donor.images))
    raise ValueError(f"image mode must be one of {IMAGE_MODES}, got {mode!r}")


__all__ = ["IMAGE_MODES", "derangement", "donor_seed", "with_image"]
