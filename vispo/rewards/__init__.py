"""Verifiable rewards: verifiers, composition, user reward functions, sandboxed execution.

Per-sample verifiers ``fn(completion, answer) -> float`` (1.0 or 0.0):
:func:`math_accuracy`, :func:`format_reward`, :func:`choice_accuracy`,
:func:`yes_no_accuracy`, :func:`exact_match`. Batch rewards follow the user API
``f(completions, answers, **columns) -> list[float | dict[str, float]]``:
:class:`CompositeReward` (weighted components, e.g. :func:`reference_reward` =
0.9 accuracy + 0.1 format), functions loaded with :func:`load_reward_fn`, and the
:data:`REWARDS` registry used by configs. :class:`RewardRunner` runs any of them in worker
processes with timeouts and turns every failure into a counted, logged zero reward.
"""

from vispo.rewards.composite import (
    REWARDS,
    CompositeReward,
    FileReward,
    MultiReward,
    RewardResult,
    TRLReward,
    combine_outputs,
    load_reward_fn,
    parse_reward_file,
    reference_reward,
    resolve_reward,
    reward_columns,
    reward_style,
)
from vispo.rewards.extract import extract_answer, extract_boxed, normalize_answer
from vispo.rewards.sandbox import ERROR_KINDS, Limits, RewardError, RewardRunner
from vispo.rewards.verifiers import (
    answers_match,
    choice_accuracy,
    choice_letter,
    exact_match,
    format_reward,
    math_accuracy,
    yes_no_accuracy,
)

__all__ = [
    "ERROR_KINDS",
    "REWARDS",
    "CompositeReward",
    "FileReward",
    "Limits",
    "MultiReward",
    "RewardError",
    "RewardResult",
    "TRLReward",
    "RewardRunner",
    "answers_match",
    "choice_accuracy",
    "choice_letter",
    "combine_outputs",
    "exact_match",
    "extract_answer",
    "extract_boxed",
    "format_reward",
    "load_reward_fn",
    "math_accuracy",
    "normalize_answer",
    "parse_reward_file",
    "reference_reward",
    "resolve_reward",
    "reward_columns",
    "reward_style",
    "yes_no_accuracy",
]
