"""Pure tensor math of vispo's objectives (imports only torch).

Every formula of ``shared/algorithms.md`` sections 1-7 lives here as a function of tensors and
plain numbers; :mod:`vispo.algos.objective` composes them into the training objective.
"""

from .advantages import (
    dynamic_sampling_keep,
    group_advantages,
    overlong_penalty,
    refill_size,
    zero_std_group_fraction,
)
from .aggregate import AGG_MODES, aggregate, masked_mean
from .contrastive import contrastive_perception_loss, cppo_perception_mask
from .entropy import (
    entropy_from_logits,
    logp_and_entropy,
    sampled_entropy,
    selective_log_softmax,
)
from .estimators import ADVANTAGE_ESTIMATORS, advantage_estimate, needs_batch_statistics
from .kl import full_kl, kl_estimate
from .noisy_rollout import noise_decay, noisy_rollout_scales
from .objective import (
    OBJECTIVE_TERMS,
    PRESETS,
    ObjectiveConfig,
    ObjectiveInputs,
    Requirements,
    aggregate_total,
    compute_objective,
    cppo_selection,
    noisy_rollout_plan,
    objective_preset,
    register_term,
    requirements,
    shaped_advantages,
)
from .perception import (
    double_entropy_loss,
    linear_anneal,
    papo_perception_loss,
    perception_kl,
    quantile_top_mask,
    top_fraction_mask,
)
from .policy import ppo_clip_loss
from .policy_losses import POLICY_LOSSES, policy_loss
from .vppo import (
    full_kl_from_logits,
    sequence_dependency,
    visual_dependency,
    vppo_advantage_weights,
    vppo_token_mask,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AGG_MODES",
    "OBJECTIVE_TERMS",
    "POLICY_LOSSES",
    "PRESETS",
    "ObjectiveConfig",
    "ObjectiveInputs",
    "Requirements",
    "advantage_estimate",
    "needs_batch_statistics",
    "aggregate",
    "aggregate_total",
    "compute_objective",
    "cppo_selection",
    "contrastive_perception_loss",
    "cppo_perception_mask",
    "double_entropy_loss",
    "dynamic_sampling_keep",
    "entropy_from_logits",
    "logp_and_entropy",
    "full_kl",
    "full_kl_from_logits",
    "group_advantages",
    "kl_estimate",
    "linear_anneal",
    "masked_mean",
    "noise_decay",
    "noisy_rollout_plan",
    "noisy_rollout_scales",
    "refill_size",
    "objective_preset",
    "overlong_penalty",
    "papo_perception_loss",
    "perception_kl",
    "policy_loss",
    "ppo_clip_loss",
    "quantile_top_mask",
    "register_term",
    "requirements",
    "sampled_entropy",
    "selective_log_softmax",
    "sequence_dependency",
    "shaped_advantages",
    "visual_dependency",
    "vppo_advantage_weights",
    "vppo_token_mask",
    "top_fraction_mask",
    "zero_std_group_fraction",
]
