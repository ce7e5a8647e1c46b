"""NoisyRollout's noise schedule (Liu et al. 2025, arXiv 2504.13055): how strongly the rollout
images of a step are noised.

The official code (NUS-TRAIL/NoisyRollout, an EasyR1 fork, ``verl/utils/image_aug.py`` at commit
09347ddd8813) noises an image in [0, 1] with the forward process of a diffusion model at step
``t = int(t0 * decay)``:

    x_t = sqrt(abar_t) * x_0 + sqrt(1 - abar_t) * eps,   eps ~ N(0, 1),   clipped to [0, 1]
    beta_s = sigmoid(linspace(-6, 6, 1000))_s * (5e-3 - 1e-5) + 1e-5,  abar_t = prod_{s<=t} (1 - beta_s)

with ``t0 = 500`` (geometry3k; 450 for K12) and the decay (the paper's "noise annealing"),
a function of the training progress ``p = step / total_steps``:

- ``none``: 1
- ``linear``: ``1 - p``
- ``sigmoid``: ``1 - sigmoid(coef * (p - mid))`` (official scripts: coef 30, mid step 40 of about
  62 steps, i.e. ``mid ~ 0.65``)

This module computes the two numbers the image op needs, ``(signal, noise_std)`` =
``(sqrt(abar_t), sqrt(1 - abar_t))``; the pixels are noised in :mod:`vispo.train.batch` with
:func:`vispo.vision.gaussian_noise`.
"""

from __future__ import annotations

import math

import torch

NOISE_ANNEAL = ("none", "linear", "sigmoid")
DIFFUSION_STEPS = 1000


def noise_decay(progress: float, mode: str = "sigmoid", *, coef: float = 30.0, mid: float = 0.65):
    """The annealing factor in [0, 1] at training ``progress`` in [0, 1] (module docstring)."""
    if mode not in NOISE_ANNEAL:
        raise ValueError(f"noise annealing must be one of {NOISE_ANNEAL}, got {mode!r}")
    p = min(max(float(progress), 0.0), 1.0)
    if mode == "none":
        return 1.0
    if mode == "linear":
        return 1.0 - p
    return 1.0 - 1.0 / (1.0 + math.exp(-coef * (p - mid)))


def diffusion_noise_scales(step: int) -> tuple[float, float]:
    """``(sqrt(abar_t), sqrt(1 - abar_t))`` of the 1000-step sigmoid beta schedule at ``step``
    (``step`` 0 already adds a little noise: ``beta_0 ~ 1.2e-5``)."""
    if not 0 <= step < DIFFUSION_STEPS:
        raise ValueError(f"diffusion step must be in [0, {DIFFUSION_STEPS}), got {step}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64))
    betas = betas * (0.5e-2 - 1e-5) + 1e-5
    abar = torch.cumprod(1 - betas, dim=0)[step].item()
    return math.sqrt(abar), math.sqrt(1.0 - abar)


def noisy_rollout_scales(
    progress: float,
    *,
    t0: int = 500,
    mode: str = "sigmoid",
    coef: float = 30.0,
    mid: float = 0.65,
) -> tuple[float, float]:
    """``(signal, noise_std)`` for the rollout images at ``progress``: the diffusion scales at step
    ``int(t0 * noise_decay(progress))``."""
    return diffusion_noise_scales(int(t0 * noise_decay(progress, mode, coef=coef, mid=mid)))
