"""The unit of data in vispo: one (images, question, answer) item, and the list that holds them.

A :class:`Sample` keeps its images as *raw sources* (file paths, encoded bytes, Hugging Face
``{"bytes", "path"}`` dicts, NumPy arrays or PIL images) and decodes them only when asked, so a
dataset of tens of thousands of items costs little memory until a batch is drawn.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

from PIL import Image

logger = logging.getLogger(__name__)


class DataError(ValueError):
    """A sample (or a whole data source) cannot be used; the message names the sample or field."""


@dataclass
class Sample:
    """One prompt of an RL data set.

    Attributes:
        id: unique identifier, used in logs and error messages (e.g. ``"geo3k/train/17"``).
        images: raw image sources in prompt order; decoded lazily by :meth:`load_images`.
        question: the question text; ``<image>`` placeholders mark where images go.
        answer: the ground truth as a string (what the reward verifiers compare against).
        meta: everything else: ``split``, ``task``, ``question_type``,
            ``vision_dependent`` (bool or None when unknown), the source's extra columns.
    """

    id: str
    images: list = field(default_factory=list)
    question: str = ""
    answer: str = ""
    meta: dict = field(default_factory=dict)

    def load_images(self) -> list[Image.Image]:
        """Decode every image source into an RGB PIL image.

        Raises ``vispo.vision.ImageLoadError`` (naming this sample) for an unreadable image.
        """
        from vispo.vision import load_image  # imported here: vision is optional for text-only use

        return [load_image(src, sample_id=self.id) for src in self.images]


class SampleDataset(Sequence):
    """A list of :class:`Sample` plus the bookkeeping of how it was loaded.

    ``skipped`` counts the rows dropped at load time by reason (``"missing_question"``,
    ``"bad_image"``, ...) and ``errors`` keeps the first few messages verbatim, so that a user can
    see *which* rows were bad without re-running anything.
    """

    def __init__(
        self,
        samples: Iterable[Sample],
        *,
        skipped: Counter | None = None,
        errors: list[str] | None = None,
        source: str = "",
        split: str = "",
    ) -> None:
        self.samples: list[Sample] = list(samples)
        self.skipped: Counter = Counter(skipped or {})
        self.errors: list[str] = list(errors or [])
        self.source = source
        self.split = split
        #: sample id -> chat-control/image tokens neutralised in its text (vispo.data.validate).
        self.neutralised: Counter = Counter()

    def __len__(self) -> int:
        return len(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> SampleDataset: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._derive(self.samples[index])
        return self.samples[index]

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __repr__(self) -> str:
        skipped = sum(self.skipped.values())
        return (
            f"SampleDataset(n={len(self)}, skipped={skipped}, source={self.source!r}, "
            f"split={self.split!r})"
        )

    @property
    def n_skipped(self) -> int:
        """Total number of rows dropped at load time."""
        return sum(self.skipped.values())

    def select(self, indices: Iterable[int]) -> SampleDataset:
        """A new dataset with the samples at ``indices`` (in that order), same bookkeeping."""
        return self._derive([self.samples[i] for i in indices])

    def filter(self, predicate: Callable[[Sample], bool]) -> SampleDataset:
        """A new dataset with the samples for which ``predicate`` is true."""
        return self._derive([s for s in self.samples if predicate(s)])

    def _derive(self, samples: list[Sample]) -> SampleDataset:
        derived = SampleDataset(
            samples, skipped=self.skipped, errors=self.errors, source=self.source, split=self.split
        )
        derived.neutralised = Counter(self.neutralised)
        return derived


def as_dataset(samples: Iterable[Sample] | SampleDataset) -> SampleDataset:
    """Wrap an iterable of samples in a :class:`SampleDataset` (one is returned as is)."""
    if isinstance(samples, SampleDataset):
        return samples
    return SampleDataset(samples)


def count_placeholders(text: str, placeholder: str = "<image>") -> int:
    """Number of image placeholders in ``text``."""
    return text.count(placeholder)


def check_image_count(sample: Sample, placeholder: str = "<image>") -> None:
    """Raise :class:`DataError` if the question's placeholders disagree with its images.

    A question without any placeholder is fine (its images are put before the text); one with
    placeholders must have exactly one per image.
    """
    n = count_placeholders(sample.question, placeholder)
    if n and n != len(sample.images):
        raise DataError(
            f"sample {sample.id!r}: the question has {n} {placeholder} placeholder(s) but the "
            f"sample has {len(sample.images)} image(s)"
        )


def _describe(value: Any) -> str:
    """A short description of a value for error messages (never the whole 1 MB string)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
