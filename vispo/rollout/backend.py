"""The generation backend interface: what the trainer needs from a rollout engine.

The trainer never calls ``model.generate`` itself: it asks a backend for ``n`` responses per
prompt and, after every policy update, hands the backend the new weights. The default
backend, :class:`HFBackend`, samples with Hugging Face ``generate`` on the policy module
itself, so its weight sync is a no-op. An engine that holds its own copy of the weights (a
vLLM engine colocated on the GPU, a remote server) implements the same two methods and is
selected with ``rollout.backend: "my_package.my_module:MyBackend"``; docs/rollout_backends.md
says what such a backend must guarantee and what was (and was not) tested here.
"""

from __future__ import annotations

import importlib
from typing import Protocol, runtime_checkable

import torch

from vispo.models.scoring import PromptBatch
from vispo.rollout.hf import Rollout, generate


@runtime_checkable
class RolloutBackend(Protocol):
    """A generation engine the trainer can drive.

    ``generate`` returns a :class:`~vispo.rollout.hf.Rollout` with the ``n`` responses of
    prompt ``i`` in rows ``i*n ... i*n + n - 1``, sampled from ``softmax(logits / temperature)``
    with optional top-p truncation and nothing else (no top-k, no repetition penalty: the
    objective scores the responses under exactly that distribution), EOS suppressed for the
    first ``min_new_tokens`` tokens. ``seed`` (when not None) makes the call reproducible.

    ``sync_weights(model)`` is called after every optimizer update with the policy module;
    the next ``generate`` must sample from those weights.

    Optional: a backend whose ``generate`` also takes ``n`` as one count per prompt (prompt i's
    rows still consecutive) sets ``per_prompt_counts = True``; NoisyRollout then decodes a
    step's clean and noised prompts in one call instead of two.
    """

    def generate(
        self,
        prompts: PromptBatch,
        *,
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        min_new_tokens: int,
        seed: int | None = None,
    ) -> Rollout: ...

    def sync_weights(self, model: torch.nn.Module) -> None: ...


class HFBackend:
    """Hugging Face ``generate`` on the policy module (left-padded batches, KV cache)."""

    per_prompt_counts = True

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        *,
        autocast: torch.dtype | None = None,
        shared_prefix: bool = False,
    ):
        self.model, self.processor, self.autocast = model, processor, autocast
        self.shared_prefix = shared_prefix

    def generate(self, prompts: PromptBatch, *, seed: int | None = None, **sampling) -> Rollout:
        return generate(
            self.model,
            self.processor,
            prompts,
            seed=seed,
            autocast=self.autocast,
            shared_prefix=self.shared_prefix,
            **sampling,
        )

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: this backend generates with the policy's own parameters."""


def load_backend(
    spec: str,
    model: torch.nn.Module,
    processor,
    *,
    autocast: torch.dtype | None = None,
    shared_prefix: bool = False,
) -> RolloutBackend:
    """The backend named by ``rollout.backend``: ``"hf"`` (prefilling each prompt once per group
    when ``shared_prefix``), or ``"module.path:Factory"`` where
    ``Factory(model, processor, autocast=...)`` returns an object with the interface above."""
    if spec == "hf":
        return HFBackend(model, processor, autocast=autocast, shared_prefix=shared_prefix)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"rollout.backend must be 'hf' or 'module.path:Factory', got {spec!r}")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"rollout.backend {spec!r} cannot be loaded: {e}") from e
    backend = factory(model, processor, autocast=autocast)
    if not isinstance(backend, RolloutBackend):
        raise TypeError(
            f"rollout.backend {spec!r} returned {type(backend).__name__}, which lacks "
            "generate(prompts, ...) and sync_weights(model)"
        )
    return backend
