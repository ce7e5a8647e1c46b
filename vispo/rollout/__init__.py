"""Generation backends. ``hf``: Hugging Face ``generate`` (default, CPU and GPU); others plug
in through :class:`RolloutBackend` (``rollout.backend``)."""

from vispo.rollout.backend import HFBackend, RolloutBackend, load_backend
from vispo.rollout.hf import (
    Rollout,
    concat_rollouts,
    finish_responses,
    generate,
    multimodal_token_ids,
    stop_token_ids,
)

__all__ = [
    "HFBackend",
    "Rollout",
    "RolloutBackend",
    "load_backend",
    "concat_rollouts",
    "finish_responses",
    "generate",
    "multimodal_token_ids",
    "stop_token_ids",
]
