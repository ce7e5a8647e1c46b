"""Generation backends. ``hf``: Hugging Face ``generate`` (default, CPU and GPU)."""

from vispo.rollout.hf import Rollout, finish_responses, generate, stop_token_ids

__all__ = ["Rollout", "finish_responses", "generate", "stop_token_ids"]
