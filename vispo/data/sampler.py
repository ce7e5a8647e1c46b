"""Deterministic, resumable order of prompts.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``: it
depends on nothing but the seed and the epoch number, so a run that is stopped and resumed from a
checkpoint (``state_dict`` = epoch and position in it) sees exactly the batches it would have seen
without the interruption.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class PromptSampler:
    """Yield batches of prompt indices, reshuffled every epoch, forever (or for ``epochs``).

    The sampler is its own iterator: ``next(sampler)`` gives the next batch and advances the
    position that :meth:`state_dict` records.

    Args:
        n_items: number of prompts in the data set.
        batch_size: prompts per batch.
        seed: the run's seed.
        drop_last: drop the incomplete last batch of each epoch (default), else yield it short.
        shuffle: ``False`` keeps the data set order (evaluation).
        epochs: stop after this many epochs; ``None`` iterates forever.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        seed: int,
        drop_last: bool = True,
        *,
        shuffle: bool = True,
        epochs: int | None = None,
    ) -> None:
        if not isinstance(n_items, (int, np.integer)) or n_items <= 0:
            raise ValueError(f"PromptSampler: n_items must be a positive int, got {n_items!r}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(
                f"PromptSampler: batch_size must be a positive int, got {batch_size!r}"
            )
        if drop_last and batch_size > n_items:
            raise ValueError(
                f"PromptSampler: batch_size={batch_size} exceeds n_items={n_items} with "
                "drop_last=True, so no batch would ever be produced"
            )
        if epochs is not None and epochs < 0:
            raise ValueError(f"PromptSampler: epochs must be >= 0 or None, got {epochs!r}")
        self.n_items = int(n_items)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        self.epochs = epochs
        self.epoch = 0
        self.position = 0  # batches already yielded in the current epoch
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def batches_per_epoch(self) -> int:
        """Number of batches in one epoch."""
        if self.drop_last:
            return self.n_items // self.batch_size
        return -(-self.n_items // self.batch_size)

    def __len__(self) -> int:
        return self.batches_per_epoch()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of all indices used in ``epoch``."""
        if not self.shuffle:
            return np.arange(self.n_items, dtype=np.int64)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_items)

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        if self.position >= self.batches_per_epoch():
            self.epoch += 1
            self.position = 0
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        if self._order_epoch != self.epoch:
            self._order = self.epoch_order(self.epoch)
            self._order_epoch = self.epoch
        start = self.position * self.batch_size
        batch = self._order[start : start + self.batch_size].tolist()
        self.position += 1
        return batch

    def state_dict(self) -> dict:
        """Everything needed to resume (plain ints/bools: JSON-serialisable)."""
        return {
            "n_items": self.n_items,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`; refuses a state saved for a different data order."""
        for key in ("n_items", "batch_size", "seed", "drop_last", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"PromptSampler.load_state_dict: saved {key}={state[key]!r} differs from "
                    f"this sampler's {getattr(self, key)!r}; resuming would change the data order"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= self.batches_per_epoch():
            raise ValueError(
                f"PromptSampler.load_state_dict: invalid epoch={epoch} position={position}"
            )
        self.epoch, self.position = epoch, position
