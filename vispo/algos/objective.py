"""The objective layer: one loss that reads like its equation, assembled from the pure terms.

    loss = PPO-clip                                  (policy)
         + beta    * KL_ref                          (reference KL, k3)
         - gamma_t * KL_prcp                         (PAPO implicit perception loss, maximised)
         + eta1_t  * H_orig + eta2_t * H_mask        (PAPO double entropy, pushed down)
         + lambda  * L_cpl                           (CPPO contrastive perception loss)
         + sum of registered extra terms

``gamma_t`` follows the optional linear annealing schedule and the entropy weights scale by the
same factor. Which forward passes the trainer must run (masked image with or without gradient,
CPPO's two views, entropies, reference model) is derived from the config by
:func:`requirements`, so the trainer never branches on the objective's name.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .aggregate import AGG_MODES, aggregate, masked_mean
from .contrastive import CPL_ESTIMATORS, contrastive_perception_loss, cppo_perception_mask
from .entropy import sampled_entropy
from .estimators import ADVANTAGE_ESTIMATORS
from .kl import KL_ESTIMATORS, kl_estimate
from .noisy_rollout import NOISE_ANNEAL, noisy_rollout_scales
from .perception import double_entropy_loss, linear_anneal, papo_perception_loss
from .policy_losses import POLICY_LOSSES, policy_loss
from .vppo import VPPO_ESTIMATORS, visual_dependency, vppo_advantage_weights, vppo_token_mask

ENTROPY_ESTIMATORS = ("sampled", "full")
MASK_ORDERS = ("before-resize", "after-resize")
_WARNED: set[str] = set()  # one-time warnings already shown in this process


def _f(default, help: str, *, factory=None):
    """A dataclass field carrying its help text (shown by ``vispo train --help``)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ObjectiveConfig:
    """Every knob of the objective. A preset (:data:`PRESETS`) is only a set of defaults."""

    name: str = _f("grpo", "Preset this objective started from (informational once loaded).")
    adv_scale: str = _f(
        "group",
        "Advantage scaling: 'group' (GRPO/DAPO: (r-mean)/std per group), 'none' (Dr. GRPO, "
        "Liu et al. 2025: r-mean), 'batch' (divide by the batch std).",
    )
    adv_eps: float = _f(1e-6, "Added to the std when scaling advantages.")
    clip_low: float = _f(0.2, "PPO lower clip epsilon (ratio >= 1 - clip_low).")
    clip_high: float = _f(
        0.3, "PPO upper clip epsilon; 0.28 is DAPO's clip-higher (Yu et al. 2025)."
    )
    dual_clip: float | None = _f(3.0, "Dual-clip bound for negative advantages (None: off).")
    agg: str = _f("token-mean", f"Loss aggregation, one of {AGG_MODES}.")
    horizon: int | None = _f(
        None,
        "Constant divisor (tokens per sequence) of 'seq-mean-token-sum-norm' (Dr. GRPO); the "
        "trainer fills in rollout.max_new_tokens when unset (verl: the max response length).",
    )
    beta: float = _f(0.01, "Weight of the reference-model KL (k3 estimator); 0 skips the pass.")
    ref_kl_estimator: str = _f("k3", f"Estimator of the reference KL, one of {KL_ESTIMATORS}.")
    dynamic_sampling: bool = _f(
        False, "DAPO dynamic sampling: keep only groups with mean accuracy in (ds_low, ds_high)."
    )
    ds_low: float = _f(0.01, "Dynamic sampling: lower bound on a group's mean accuracy.")
    ds_high: float = _f(0.99, "Dynamic sampling: upper bound on a group's mean accuracy.")
    ds_max_rounds: int = _f(
        20,
        "Dynamic sampling: cap on generation rounds per step (DAPO: 20). Round 1 rolls out the "
        "full batch, a later round only ceil(deficit / informative fraction so far) prompts "
        "(at least the deficit, at most the full batch).",
    )

    # PAPO (Wang et al. 2025, "Perception-Aware Policy Optimization").
    gamma: float = _f(
        0.0,
        "PAPO perception-KL weight (maximised). Paper: 0.02 PAPO-G, 0.01 PAPO-D; 0.04 collapses.",
    )
    gamma_end: float | None = _f(
        None, "PAPO: anneal gamma linearly to this value (None: constant)."
    )
    gamma_anneal_frac: float = _f(
        1.0, "PAPO: fraction of training over which gamma anneals (entropy weights follow)."
    )
    masked_grad: bool = _f(
        False,
        "PAPO: recompute the masked-image pass with gradient in every micro-batch (paper). "
        "False (reference code): scored once with the pre-update policy and held fixed.",
    )
    mask_ratio: float = _f(0.6, "PAPO: probability that each image patch is blacked out.")
    mask_patch_size: int = _f(14, "PAPO: side of the square masking patches, in pixels.")
    mask_order: str = _f(
        "before-resize",
        "PAPO: where the patch mask is drawn. 'before-resize' (reference code): on the dataset's "
        "image, which is then resized to the processor's pixel budget like the clean image, so "
        "patches are mask_patch_size px in the original image. 'after-resize': on the resized "
        "image, so patches are mask_patch_size px as the model sees them.",
    )
    perception_kl_clip: float | None = _f(
        None, "PAPO option: clamp per-token perception KL to [0, value] (reference: 0.2)."
    )
    perception_top_frac: float | None = _f(
        None,
        "PAPO option (reference top_p, 0.2): per sequence keep the tokens whose KL is at or above "
        "the (1 - value) quantile, selected before clipping; the mean still divides by every "
        "response token.",
    )
    eta_orig: float = _f(0.0, "PAPO double entropy: weight of H(original); 0.03 PAPO-D.")
    eta_mask: float = _f(0.0, "PAPO double entropy: weight of H(masked); 0.03 PAPO-D.")
    entropy_estimator: str = _f(
        "sampled", "PAPO entropy: 'sampled' (-log p of the sampled token, reference) or 'full'."
    )

    # CPPO (Contrastive Perception Policy Optimization).
    cpl_lambda: float = _f(0.0, "CPPO: weight of the contrastive perception loss (paper: 0.01).")
    cpl_tau: float = _f(0.1, "CPPO: InfoNCE temperature tau.")
    cpl_top_frac: float = _f(0.5, "CPPO: fraction of eligible tokens kept as perception tokens.")
    cpl_gate: bool = _f(True, "CPPO: only sequences with positive advantage carry the loss.")
    cpl_estimator: str = _f("k3", f"CPPO: divergence estimator, one of {CPL_ESTIMATORS}.")
    cpl_select: str = _f(
        "perception", "CPPO: 'perception' (entropy-shift tokens) or 'all' response tokens."
    )
    cpl_blur: bool = _f(False, "CPPO: include Gaussian blur among the preserving views.")

    # Policy-loss variants and advantage estimators (vispo.algos.policy_losses / estimators).
    policy_loss: str = _f(
        "ppo",
        f"Policy loss, one of {POLICY_LOSSES}: PPO-clip; GSPO (Zheng et al. 2025, sequence ratio) "
        "or its token form; CISPO (MiniMax-M1 2025, clipped stop-gradient IS weight); SAPO "
        "(arXiv 2511.20347, soft gate).",
    )
    tau_pos: float = _f(1.0, "SAPO: gate temperature for positive advantages (paper: 1.0).")
    tau_neg: float = _f(1.05, "SAPO: gate temperature for non-positive advantages (paper: 1.05).")
    advantage: str = _f(
        "grpo",
        f"Advantage estimator, one of {ADVANTAGE_ESTIMATORS}: GRPO (adv_scale applies), RLOO "
        "(leave-one-out), REINFORCE++ (batch-whitened, Hu 2025) with or without the group mean.",
    )

    # VPPO (Huang et al. 2025, arXiv 2510.09285): reuses PAPO's masked image (mask_ratio).
    vppo_top_frac: float | None = _f(
        None,
        "VPPO: restrict the policy gradient to this top fraction of tokens per sequence by visual "
        "dependency (KL between the original- and masked-image distributions; paper: 0.4).",
    )
    vppo_scale_min: float | None = _f(
        None,
        "VPPO: reweight each trajectory's advantage by its mean visual dependency, mapped to "
        "[scale_min, b] with mean 1 (paper: 0.9). None: no reweighting.",
    )
    vppo_estimator: str = _f(
        "k3",
        "VPPO: visual dependency estimator, 'k3' (sampled token, the official code) or 'full' "
        "(full-vocabulary KL, the paper's equation; one no-grad original pass more).",
    )

    # NoisyRollout (Liu et al. 2025, arXiv 2504.13055): rollouts only; scoring uses clean images.
    noisy_frac: float = _f(
        0.0,
        "NoisyRollout: share of each group rolled out on a noised copy of the image (paper: "
        "half); the responses are scored and updated against the clean image. 0 = off.",
    )
    noisy_t0: int = _f(
        500, "NoisyRollout: initial diffusion noise step (of 1000; official: 500 Geo3K, 450 K12)."
    )
    noisy_anneal: str = _f(
        "sigmoid", f"NoisyRollout: noise annealing over training, one of {NOISE_ANNEAL}."
    )
    noisy_anneal_coef: float = _f(30.0, "NoisyRollout: sigmoid annealing steepness (official 30).")
    noisy_anneal_mid: float = _f(
        0.65, "NoisyRollout: training fraction where the sigmoid decay is 1/2 (official ~40/62)."
    )

    extra_terms: dict[str, dict] = _f(
        None,
        "Registered extra terms: {name: {weight: w, ...params}} (see register_term).",
        factory=dict,
    )
    plugins: list[str] = _f(
        None,
        "Modules or .py files imported before the config is checked, so that the terms they "
        "register can be named in extra_terms (installed packages: entry points 'vispo.terms').",
        factory=list,
    )

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field for any inconsistent value."""
        choices = {
            "adv_scale": ("group", "none", "batch"),
            "agg": AGG_MODES,
            "ref_kl_estimator": KL_ESTIMATORS,
            "entropy_estimator": ENTROPY_ESTIMATORS,
            "cpl_estimator": CPL_ESTIMATORS,
            "cpl_select": ("perception", "all"),
            "policy_loss": POLICY_LOSSES,
            "advantage": ADVANTAGE_ESTIMATORS,
            "noisy_anneal": NOISE_ANNEAL,
            "vppo_estimator": VPPO_ESTIMATORS,
            "mask_order": MASK_ORDERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"objective.{name} must be one of {allowed}, got {getattr(self, name)!r}"
                )
        for name in (
            "beta",
            "gamma",
            "eta_orig",
            "eta_mask",
            "cpl_lambda",
            "clip_low",
            "clip_high",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"objective.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.noisy_frac <= 1.0:
            raise ValueError(f"objective.noisy_frac must be in [0, 1], got {self.noisy_frac}")
        if not 0 <= self.noisy_t0 < 1000:
            raise ValueError(f"objective.noisy_t0 must be in [0, 1000), got {self.noisy_t0}")
        if self.vppo_top_frac is not None and not 0.0 < self.vppo_top_frac <= 1.0:
            raise ValueError(f"objective.vppo_top_frac must be in (0, 1], got {self.vppo_top_frac}")
        if self.vppo_scale_min is not None and not 0.0 <= self.vppo_scale_min <= 1.0:
            raise ValueError(
                f"objective.vppo_scale_min must be in [0, 1], got {self.vppo_scale_min}"
            )
        if self.uses_vppo and self.uses_papo and self.masked_grad:
            raise ValueError(
                "objective.vppo_* needs the masked pass scored once with the pre-update policy: "
                "set objective.masked_grad=false"
            )
        for name in ("tau_pos", "tau_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"objective.{name} must be > 0, got {getattr(self, name)}")
        if self.gamma_end is not None and self.gamma_end < 0:
            raise ValueError(f"objective.gamma_end must be >= 0, got {self.gamma_end}")
        if not 0.0 < self.mask_ratio <= 1.0:
            raise ValueError(f"objective.mask_ratio must be in (0, 1], got {self.mask_ratio}")
        for name in ("gamma_anneal_frac", "cpl_top_frac"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"objective.{name} must be in (0, 1], got {getattr(self, name)}")
        if self.perception_top_frac is not None and not 0.0 < self.perception_top_frac <= 1.0:
            raise ValueError(
                f"objective.perception_top_frac must be in (0, 1], got {self.perception_top_frac}"
            )
        if self.perception_kl_clip is not None and self.perception_kl_clip <= 0:
            raise ValueError(
                f"objective.perception_kl_clip must be > 0, got {self.perception_kl_clip}"
            )
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"objective.dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.cpl_tau <= 0:
            raise ValueError(f"objective.cpl_tau must be > 0, got {self.cpl_tau}")
        if not 0.0 <= self.ds_low < self.ds_high <= 1.0:
            raise ValueError("objective.ds_low/ds_high must satisfy 0 <= low < high <= 1")
        if self.ds_max_rounds < 1:
            raise ValueError(f"objective.ds_max_rounds must be >= 1, got {self.ds_max_rounds}")
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"objective.horizon must be >= 1 or None, got {self.horizon}")
        if self.mask_patch_size < 1:
            raise ValueError(f"objective.mask_patch_size must be >= 1, got {self.mask_patch_size}")
        for term in self.extra_terms:
            if term not in OBJECTIVE_TERMS:
                close = difflib.get_close_matches(term, OBJECTIVE_TERMS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"objective.extra_terms: unknown term {term!r}{hint}")
        if self.eta_mask > 0 and not self.masked_grad and "eta_mask" not in _WARNED:
            _WARNED.add("eta_mask")
            warnings.warn(
                "objective.eta_mask > 0 with masked_grad=False: the masked-image entropy term is "
                "a constant and contributes no gradient (as in the PAPO reference code; warned "
                "once). Set masked_grad=True to make it a real term.",
                stacklevel=4,
            )

    @property
    def uses_papo(self) -> bool:
        return self.gamma > 0 or self.eta_mask > 0

    @property
    def uses_cppo(self) -> bool:
        return self.cpl_lambda > 0

    @property
    def uses_vppo(self) -> bool:
        return self.vppo_top_frac is not None or self.vppo_scale_min is not None


# Section 10 of algorithms.md. PAPO-G here is the 3B recipe (no entropy terms); the 7B recipe
# adds eta_orig = eta_mask = 0.05.
PRESETS: dict[str, dict] = {
    "grpo": dict(adv_scale="group", clip_low=0.2, clip_high=0.3, beta=0.01),
    "dapo": dict(adv_scale="group", clip_low=0.2, clip_high=0.28, beta=0.0, dynamic_sampling=True),
    "dr_grpo": dict(
        adv_scale="none", clip_low=0.2, clip_high=0.2, beta=0.0, agg="seq-mean-token-sum-norm"
    ),
    "papo_g": dict(adv_scale="group", clip_low=0.2, clip_high=0.3, beta=0.01, gamma=0.02),
    "papo_d": dict(
        adv_scale="group",
        clip_low=0.2,
        clip_high=0.28,
        beta=0.0,
        dynamic_sampling=True,
        gamma=0.01,
        eta_orig=0.03,
        eta_mask=0.03,
    ),
    "cppo": dict(
        adv_scale="group",
        clip_low=0.2,
        clip_high=0.2,
        beta=0.01,
        cpl_lambda=0.01,
        cpl_tau=0.1,
        cpl_top_frac=0.5,
        cpl_gate=True,
    ),
    # GSPO (Zheng et al. 2025; verl examples/gspo_trainer): clip 3e-4/4e-4 on the
    # sequence ratio, sequence-mean aggregation, no KL.
    "gspo": dict(
        policy_loss="gspo", clip_low=3e-4, clip_high=4e-4, beta=0.0, agg="seq-mean-token-mean"
    ),
    # SAPO (arXiv 2511.20347; verl examples/sapo_trainer): tau 1.0/1.05, no clip, no KL loss.
    "sapo": dict(
        policy_loss="sapo", tau_pos=1.0, tau_neg=1.05, beta=0.0, agg="seq-mean-token-mean"
    ),
    # CISPO (MiniMax-M1, arXiv 2506.13585): only the upper bound of the IS weight binds (verl's
    # example: clip_ratio_low=10, clip_ratio_high=0.2), token-mean.
    "cispo": dict(policy_loss="cispo", clip_low=10.0, clip_high=0.2, beta=0.001),
    # VPPO (arXiv 2510.09285; VPPO-RL examples/configs/train_vppo_7b.sh + config.yaml): top 40%
    # tokens, advantage scaling from 0.9, masked image with patch probability 0.5, sampled-token
    # entropy penalty 0.06, KL loss 0.01, clip 0.2/0.28.
    "vppo": dict(
        adv_scale="group",
        clip_low=0.2,
        clip_high=0.28,
        beta=0.01,
        vppo_top_frac=0.4,
        vppo_scale_min=0.9,
        mask_ratio=0.5,
        eta_orig=0.06,
    ),
    # NoisyRollout (arXiv 2504.13055; NUS-TRAIL/NoisyRollout training_scripts): GRPO with half of
    # each group on noised images, diffusion step 500 annealed by a sigmoid (coef 30), KL loss 0.01.
    "noisyrollout": dict(
        adv_scale="group", clip_low=0.2, clip_high=0.3, beta=0.01, noisy_frac=0.5, noisy_t0=500
    ),
}


def objective_preset(name: str, **overrides) -> ObjectiveConfig:
    """The named preset's config, with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown objective preset {name!r}{hint}; choose from {sorted(PRESETS)}")
    return ObjectiveConfig(name=name, **{**PRESETS[name], **overrides})


def noisy_rollout_plan(cfg: ObjectiveConfig, n: int, progress: float) -> dict:
    """NoisyRollout's rollout for one step: ``n_noisy`` of the ``n`` responses per prompt on
    images scaled by ``signal`` with Gaussian noise of std ``noise_std`` (0 noisy when off)."""
    n_noisy = int(round(cfg.noisy_frac * n))
    signal, noise_std = noisy_rollout_scales(
        progress,
        t0=cfg.noisy_t0,
        mode=cfg.noisy_anneal,
        coef=cfg.noisy_anneal_coef,
        mid=cfg.noisy_anneal_mid,
    )
    return dict(n_noisy=n_noisy, signal=signal, noise_std=noise_std)


@dataclass(frozen=True)
class Requirements:
    """Which passes the trainer must run for an objective.

    ``variants``: image variant -> ``"fixed"`` (scored once per rollout batch with the
    pre-update policy, no gradient) or ``"grad"`` (recomputed with gradient in the update).
    ``entropy``: the passes whose full-vocabulary entropy is needed. ``ref``: reference-model
    log-probs. ``cppo_positive_only``: the CPPO views are needed only for sequences with positive
    advantage (everything else carries no contrastive loss). ``old_logp``: the pre-update
    policy's log-probs of the whole mini-batch are needed before its first micro-batch (VPPO's
    trajectory reweighting), so the old-policy pass runs even for an exactly on-policy update
    split into several micro-batches (in one micro-batch the objective computes it itself). ``kl``: the variants whose full-vocabulary KL from the
    original image (pre-update policy) is needed (VPPO's ``full`` estimator).
    """

    variants: dict[str, str]
    entropy: frozenset[str]
    ref: bool
    cppo_positive_only: bool
    old_logp: bool = False
    kl: frozenset[str] = frozenset()


def requirements(cfg: ObjectiveConfig) -> Requirements:
    variants: dict[str, str] = {}
    entropy: set[str] = set()
    if cfg.uses_papo:
        variants["mask"] = "grad" if cfg.masked_grad else "fixed"
        if cfg.entropy_estimator == "full":
            if cfg.eta_orig > 0:
                entropy.add("orig")
            if cfg.eta_mask > 0:
                entropy.add("mask")
    elif cfg.eta_orig > 0 and cfg.entropy_estimator == "full":
        entropy.add("orig")
    if cfg.uses_vppo:  # the dependency is measured with the pre-update policy (official code)
        variants["mask"] = "fixed"
    if cfg.uses_cppo:
        variants["pos"] = "grad"
        variants["neg"] = "grad"
        if cfg.cpl_select == "perception":
            entropy |= {"orig", "neg"}
    return Requirements(
        variants=variants,
        entropy=frozenset(entropy),
        ref=cfg.beta > 0,
        cppo_positive_only=cfg.uses_cppo and cfg.cpl_gate,
        old_logp=cfg.vppo_scale_min is not None,
        kl=frozenset({"mask"}) if cfg.uses_vppo and cfg.vppo_estimator == "full" else frozenset(),
    )


def shaped_advantages(
    cfg: ObjectiveConfig,
    advantages: torch.Tensor,
    rows: torch.Tensor,
    old_logp: torch.Tensor | None,
    logp_mask: torch.Tensor | None,
    mask: torch.Tensor,
    dependency: torch.Tensor | None = None,
) -> torch.Tensor:
    """The advantages with the ``rows`` of one mini-batch reweighted by VPPO's trajectory
    dependency (:func:`vppo_advantage_weights` over those rows); unchanged without VPPO.
    ``dependency``: the full-vocabulary KL ``[B, T]`` (``vppo_estimator='full'``).
    ``old_logp`` None (an exactly on-policy update in one micro-batch): unchanged, and
    :func:`compute_objective` reweights that micro-batch, which is the whole mini-batch."""
    if cfg.vppo_scale_min is None:
        return advantages
    if cfg.vppo_estimator == "full":
        if dependency is None:
            raise ValueError("vppo_estimator='full' needs the full-vocabulary KL (dependency)")
        dep = dependency[rows]
    elif old_logp is None:
        return advantages
    elif logp_mask is None:
        raise ValueError("objective.vppo_scale_min needs masked-image log-probs")
    else:
        dep = visual_dependency(old_logp[rows], logp_mask[rows])
    weights = vppo_advantage_weights(dep, mask[rows], scale_min=cfg.vppo_scale_min)
    out = advantages.clone()
    out[rows] = advantages[rows] * (weights if advantages.ndim == 1 else weights[:, None])
    return out


@dataclass
class ObjectiveInputs:
    """Per-token tensors for one (micro-)batch. ``[B, T]`` unless noted; all log-probs float32.

    ``logp`` carries gradient (current policy, original image). ``old_logp`` None means exactly
    on-policy (old = current, detached). Variant log-probs/entropies are None when not scored.
    ``cppo_rows`` (long ``[B']``): when given, ``logp_pos``/``logp_neg``/``entropy_neg`` (and the
    CPPO ``full_*`` tensors) cover only these rows of the batch. ``cppo_selected``: the CPPO
    perception tokens of those rows, when the caller selected them beforehand
    (:func:`cppo_selection`); otherwise they are selected here from the entropies.
    """

    logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    logp_mask: torch.Tensor | None = None
    logp_pos: torch.Tensor | None = None
    logp_neg: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None
    entropy_pos: torch.Tensor | None = None
    entropy_neg: torch.Tensor | None = None
    cppo_rows: torch.Tensor | None = None
    cppo_selected: torch.Tensor | None = None  # bool [B', T]: CPPO tokens chosen beforehand
    full_logp: torch.Tensor | None = None  # [B, T, V], CPPO "full" estimator only
    full_logp_pos: torch.Tensor | None = None
    full_logp_neg: torch.Tensor | None = None
    dependency: torch.Tensor | None = None  # VPPO 'full': KL(pi(.|I) || pi(.|I_mask)), no grad


def aggregate_total(mask: torch.Tensor, mode: str, horizon: int | None = None) -> torch.Tensor:
    """The denominator ``aggregate`` uses for ``mask``; pass a mini-batch's value as ``total`` to
    every micro-batch so their losses sum to the exact mini-batch loss."""
    m = mask.float()
    if mode == "token-mean":
        return m.sum() + 1e-8
    if mode == "seq-mean-token-mean":
        return (m.sum(-1) > 0).sum().clamp(min=1).float()
    if mode == "seq-mean-token-sum":
        return torch.tensor(float(max(m.shape[0], 1)))
    if mode == "seq-mean-token-sum-norm":
        return torch.tensor(float(m.shape[0] * (m.shape[-1] if horizon is None else horizon)))
    raise ValueError(f"mode must be one of {AGG_MODES}, got {mode!r}")


# --- extra terms -------------------------------------------------------------------------------

TermFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
OBJECTIVE_TERMS: dict[str, TermFn] = {}


def register_term(name: str) -> Callable[[TermFn], TermFn]:
    """Register an extra objective term without editing the core.

    The function is called as ``fn(inputs: ObjectiveInputs, **params)`` with the params given in
    ``ObjectiveConfig.extra_terms[name]`` (minus ``weight``) and returns ``(loss, metrics)``; the
    objective adds ``weight * loss`` and logs it as ``loss/{name}``.
    """

    def deco(fn: TermFn) -> TermFn:
        if name in OBJECTIVE_TERMS and OBJECTIVE_TERMS[name] is not fn:
            raise ValueError(f"objective term {name!r} is already registered")
        OBJECTIVE_TERMS[name] = fn
        return fn

    return deco


# --- the objective ---------------------------------------------------------------------------


def compute_objective(
    cfg: ObjectiveConfig,
    x: ObjectiveInputs,
    *,
    progress: float = 0.0,
    gamma_scale: float = 1.0,
    total: torch.Tensor | float | None = None,
    token_total: torch.Tensor | float | None = None,
    cpl_total: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Compose the objective for one (micro-)batch. Returns ``(loss, metrics)``.

    ``progress``: fraction of training done (annealing). ``gamma_scale``: multiplier set by the
    collapse guard (1 = unchanged). The three denominators, each ``None`` to normalise within
    this batch, or the mini-batch-wide value so that micro-batch losses sum to the mini-batch
    loss: ``total`` for ``cfg.agg`` (:func:`aggregate_total` of the response mask);
    ``token_total``, the response-token count, for PAPO's entropy terms (token means whatever
    ``cfg.agg``, as in the reference code); ``cpl_total``, the count of CPPO's selected tokens,
    for its contrastive term when ``cfg.agg`` is token-mean (the seq-mean modes use ``total``).
    """
    mask = x.mask.float()
    agg = dict(horizon=cfg.horizon, total=total)
    if token_total is None and cfg.agg == "token-mean":
        token_total = total
    token_agg = dict(total=token_total)
    old = x.logp.detach() if x.old_logp is None else x.old_logp
    metrics: dict[str, torch.Tensor] = {}
    advantages = x.advantages
    if cfg.uses_vppo:
        if cfg.vppo_estimator == "full":
            if x.dependency is None:
                raise ValueError("vppo_estimator='full' needs the full-vocabulary KL (dependency)")
            dependency = x.dependency
        elif x.logp_mask is None:
            raise ValueError("objective.vppo_* needs masked-image log-probs (logp_mask)")
        else:
            dependency = visual_dependency(old, x.logp_mask)
        metrics["perception/dependency_mean"] = masked_mean(dependency, mask)
        if cfg.vppo_scale_min is not None and x.old_logp is None and x.dependency is None:
            # On-policy in one micro-batch (no old pass was scored): this batch is the mini-batch,
            # so the trajectory reweighting is computed here (else by shaped_advantages).
            w = vppo_advantage_weights(dependency, mask, scale_min=cfg.vppo_scale_min)
            advantages = advantages * (w if advantages.ndim == 1 else w[:, None])
        if cfg.vppo_top_frac is not None:  # zero advantage = no policy gradient on the token
            selected = vppo_token_mask(dependency, mask, top_frac=cfg.vppo_top_frac)
            adv = advantages if advantages.ndim == 2 else advantages[:, None]
            advantages = adv * selected
            metrics["perception/vppo_selected_frac"] = masked_mean(selected.float(), mask)

    policy, clip_metrics = policy_loss(
        cfg.policy_loss,
        x.logp,
        old,
        advantages,
        mask,
        clip_low=cfg.clip_low,
        clip_high=cfg.clip_high,
        dual_clip=cfg.dual_clip,
        tau_pos=cfg.tau_pos,
        tau_neg=cfg.tau_neg,
        agg=cfg.agg,
        **agg,
    )
    metrics.update(clip_metrics)
    metrics["loss/policy"] = policy.detach()
    loss = policy

    if cfg.beta > 0:
        if x.ref_logp is None:
            raise ValueError("objective.beta > 0 needs reference log-probs (ref_logp)")
        ref_kl = kl_estimate(x.logp, x.ref_logp, cfg.ref_kl_estimator)
        term = cfg.beta * aggregate(ref_kl, mask, cfg.agg, **agg)
        metrics["loss/ref_kl"] = term.detach()
        metrics["kl/ref"] = masked_mean(ref_kl, mask)
        loss = loss + term

    if cfg.uses_papo:
        if x.logp_mask is None:
            raise ValueError(
                "objective.gamma/eta_mask > 0 needs masked-image log-probs (logp_mask)"
            )
        gamma_t = linear_anneal(
            progress, start=cfg.gamma, end=cfg.gamma_end, frac=cfg.gamma_anneal_frac
        )
        factor = gamma_t / cfg.gamma if cfg.gamma > 0 else 1.0
        gamma_t *= gamma_scale
        logp_mask = x.logp_mask if cfg.masked_grad else x.logp_mask.detach()
        term, kl_prcp = papo_perception_loss(
            x.logp,
            logp_mask,
            mask,
            gamma=gamma_t,
            agg=cfg.agg,
            kl_clip=cfg.perception_kl_clip,
            top_frac=cfg.perception_top_frac,
            **agg,
        )
        metrics["loss/perception_kl"] = term.detach()
        metrics["perception/kl_mean"] = masked_mean(kl_prcp, mask)
        metrics["perception/gamma"] = torch.tensor(gamma_t)
        loss = loss + term

        if cfg.eta_orig > 0 or cfg.eta_mask > 0:
            h_orig, h_mask = _entropies(
                cfg.entropy_estimator, x.logp, x.entropy, logp_mask, x.entropy_mask
            )
            t_orig, t_mask = double_entropy_loss(
                h_orig,
                h_mask,
                mask,
                eta_orig=cfg.eta_orig * factor * gamma_scale,
                eta_mask=cfg.eta_mask * factor * gamma_scale,
                agg="token-mean",
                **token_agg,
            )
            metrics["loss/entropy_orig"] = t_orig.detach()
            metrics["loss/entropy_mask"] = t_mask.detach()
            loss = loss + t_orig + t_mask
    elif cfg.eta_orig > 0:
        h_orig = _entropy(cfg.entropy_estimator, x.logp, x.entropy, "entropy")
        t_orig = cfg.eta_orig * aggregate(h_orig, mask, "token-mean", **token_agg)
        metrics["loss/entropy_orig"] = t_orig.detach()
        loss = loss + t_orig

    if cfg.uses_cppo:
        if cfg.agg == "token-mean":
            cpl_den = cpl_total
        else:  # the seq-mean modes divide by every sequence of the batch, as the recipe does
            cpl_den = total if total is not None else aggregate_total(mask, cfg.agg, cfg.horizon)
        term, cppo_metrics = _cppo_term(cfg, x, mask, cpl_den)
        term = cfg.cpl_lambda * term
        metrics.update(cppo_metrics)
        metrics["loss/cpl"] = term.detach()
        loss = loss + term

    for name, params in cfg.extra_terms.items():
        params = dict(params)
        weight = float(params.pop("weight", 1.0))
        term, term_metrics = OBJECTIVE_TERMS[name](x, **params)
        metrics.update(term_metrics)
        metrics[f"loss/{name}"] = (weight * term).detach()
        loss = loss + weight * term

    metrics.update(_entropy_metrics(x, mask))
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def _entropy(estimator: str, logp, full, what: str) -> torch.Tensor:
    if estimator == "sampled":
        return sampled_entropy(logp)
    if full is None:
        raise ValueError(f"entropy_estimator='full' needs full-vocabulary entropies ({what})")
    return full


def _entropies(estimator, logp, h_full, logp_mask, h_mask_full):
    return (
        _entropy(estimator, logp, h_full, "entropy"),
        _entropy(estimator, logp_mask, h_mask_full, "entropy_mask"),
    )


def cppo_selection(
    cfg: ObjectiveConfig,
    entropy: torch.Tensor | None,
    entropy_neg: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """CPPO's tokens for ``cfg`` (bool ``[B, T]``, no gradient): the perception tokens of
    :func:`cppo_perception_mask` (``cpl_select: perception``, needs both full entropies) or
    every response token (``all``), with the advantage gate when ``cpl_gate``."""
    if cfg.cpl_select == "perception":
        if entropy is None or entropy_neg is None:
            raise ValueError("CPPO token selection needs full entropies (entropy, entropy_neg)")
        return cppo_perception_mask(
            entropy, entropy_neg, advantages, mask, top_frac=cfg.cpl_top_frac, gate=cfg.cpl_gate
        )
    selected = mask.bool()
    if cfg.cpl_gate:
        seq_adv = advantages if advantages.ndim == 1 else advantages[:, 0]
        selected = selected & (seq_adv > 0)[:, None]
    return selected


def _cppo_term(cfg: ObjectiveConfig, x: ObjectiveInputs, mask: torch.Tensor, total=None):
    if x.logp_pos is None or x.logp_neg is None:
        raise ValueError("objective.cpl_lambda > 0 needs I+ and I- log-probs (logp_pos, logp_neg)")
    rows = x.cppo_rows
    take = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
    logp, m, adv = take(x.logp), take(mask), take(x.advantages)
    if x.cppo_selected is not None:
        selected = x.cppo_selected.bool()
    else:
        selected = cppo_selection(
            cfg, None if x.entropy is None else take(x.entropy), x.entropy_neg, adv, m
        )
    if cfg.cpl_estimator == "full":
        if x.full_logp is None or x.full_logp_pos is None or x.full_logp_neg is None:
            raise ValueError("cpl_estimator='full' needs full log-prob tensors [B, T, V]")
        inputs = (take(x.full_logp), x.full_logp_pos, x.full_logp_neg)
    else:
        inputs = (logp, x.logp_pos, x.logp_neg)
    loss, metrics = contrastive_perception_loss(
        *inputs,
        selected,
        tau=cfg.cpl_tau,
        estimator=cfg.cpl_estimator,
        agg=cfg.agg,
        horizon=cfg.horizon,
        total=total,
    )
    metrics["perception/selected_frac"] = selected.float().sum() / (mask.sum() + 1e-8)
    return loss, metrics


def _entropy_metrics(x: ObjectiveInputs, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``entropy/{orig,mask,pos,neg}``: full entropies where scored, else the sampled estimate."""
    out = {}
    with torch.no_grad():
        out["entropy/orig"] = masked_mean(
            x.entropy if x.entropy is not None else sampled_entropy(x.logp), mask
        )
        if x.entropy_mask is not None or x.logp_mask is not None:
            h = x.entropy_mask if x.entropy_mask is not None else sampled_entropy(x.logp_mask)
            out["entropy/mask"] = masked_mean(h, mask)
        rows_mask = mask if x.cppo_rows is None else mask.index_select(0, x.cppo_rows)
        for key, h, lp in (("pos", x.entropy_pos, x.logp_pos), ("neg", x.entropy_neg, x.logp_neg)):
            if h is not None or lp is not None:
                out[f"entropy/{key}"] = masked_mean(
                    h if h is not None else sampled_entropy(lp), rows_mask
                )
    return out
