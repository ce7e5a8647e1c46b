"""Generation backends. ``hf``: Hugging Face ``generate`` (default, CPU and GPU)."""

from vispo.rollout.hf import (
    Rollout,
    concat_rollouts,
    finish_responses,
    generate,
    multimodal_token_ids,
    stop_token_ids,
)

__all__ = [
    "Rollout",
    "concat_rollouts",
    "finish_responses",
    "generate",
    "multimodal_token_ids",
    "stop_token_ids",
]
