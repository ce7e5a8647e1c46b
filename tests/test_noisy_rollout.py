"""NoisyRollout: the noise schedule by hand, the noised images, the mixed rollout, and an
end-to-end run composed with PAPO-G on a tiny model."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from vispo.algos import ObjectiveConfig, noise_decay, noisy_rollout_plan, noisy_rollout_scales
from vispo.algos.noisy_rollout import diffusion_noise_scales
from vispo.rewards import RewardRunner
from vispo.rollout.hf import Rollout
from vispo.train import batch as B
from vispo.train.config import load_config
from vispo.train.trainer import Trainer


def test_noise_decay_by_hand():
    assert noise_decay(0.3, "none") == 1.0
    assert noise_decay(0.3, "linear") == pytest.approx(0.7)
    assert noise_decay(0.65, "sigmoid", coef=30, mid=0.65) == pytest.approx(0.5)
    # p = 0: 1 - sigmoid(-19.5) = 1 - 3.4e-9; p = 1: 1 - sigmoid(10.5) = 2.75e-5.
    assert noise_decay(0.0, "sigmoid") == pytest.approx(1 - 1 / (1 + math.exp(19.5)))
    assert noise_decay(1.0, "sigmoid") == pytest.approx(1 / (1 + math.exp(10.5)), rel=1e-6)
    with pytest.raises(ValueError, match="annealing"):
        noise_decay(0.1, "cosine")


def test_diffusion_scales_by_hand():
    # beta_s = sigmoid(-6 + 12 s / 999) * (5e-3 - 1e-5) + 1e-5, abar_t = prod (1 - beta_s).
    def beta(s):
        return 1 / (1 + math.exp(-(-6 + 12 * s / 999))) * (0.5e-2 - 1e-5) + 1e-5

    signal, std = diffusion_noise_scales(0)
    assert signal == pytest.approx(math.sqrt(1 - beta(0)), rel=1e-12)
    assert std == pytest.approx(math.sqrt(beta(0)), rel=1e-9)
    abar = math.prod(1 - beta(s) for s in range(501))
    signal, std = diffusion_noise_scales(500)
    assert signal == pytest.approx(math.sqrt(abar), rel=1e-9)
    assert std == pytest.approx(math.sqrt(1 - abar), rel=1e-9)
    assert 0.5 < std < 0.51  # t = 500: noise std about half the pixel range
    # Annealed: at the end of training the step is int(500 * 2.75e-5) = 0.
    assert noisy_rollout_scales(1.0) == diffusion_noise_scales(0)
    assert noisy_rollout_scales(0.0) == diffusion_noise_scales(499)  # int(500 * (1 - 3e-9))


def test_plan_counts_the_noisy_share():
    cfg = ObjectiveConfig(noisy_frac=0.5, noisy_anneal="linear")
    plan = noisy_rollout_plan(cfg, 6, 0.5)
    assert plan["n_noisy"] == 3
    assert (plan["signal"], plan["noise_std"]) == diffusion_noise_scales(250)
    assert noisy_rollout_plan(ObjectiveConfig(), 6, 0.0)["n_noisy"] == 0
    with pytest.raises(ValueError, match="noisy_frac"):
        ObjectiveConfig(noisy_frac=1.5)


def test_noised_images_are_seeded_per_prompt_and_keep_the_size():
    img = Image.fromarray(np.full((6, 8, 3), 200, dtype=np.uint8))
    a = B.noised_images([[img], [img]], [(0, 1, 0), (0, 1, 1)], 7, signal=0.5, noise_std=0.1)
    b = B.noised_images([[img]], [(0, 1, 1)], 7, signal=0.5, noise_std=0.1)
    assert a[0][0].size == img.size
    assert np.array_equal(np.asarray(a[1][0]), np.asarray(b[0][0]))  # same key, same draw
    assert not np.array_equal(np.asarray(a[0][0]), np.asarray(a[1][0]))
    # Mean ~ 0.5 * 200 = 100, spread ~ 0.1 * 255 = 25.5 (48 pixels x 3 channels).
    arr = np.asarray(a[0][0]).astype(float)
    assert abs(arr.mean() - 100) < 8 and 15 < arr.std() < 36
    same = B.noised_images([[img]], [(0, 1, 0)], 7, signal=1.0, noise_std=0.0)
    assert np.array_equal(np.asarray(same[0][0]), np.asarray(img))


def _rollout(texts, n, T):
    P = len(texts) // n
    ids = torch.arange(len(texts) * T).view(len(texts), T)
    return Rollout(
        response_ids=ids,
        response_mask=torch.ones(len(texts), T),
        lengths=torch.full((len(texts),), T),
        stopped=torch.ones(len(texts), dtype=torch.bool),
        texts=texts,
        n=n,
        prompt_index=torch.arange(P).repeat_interleave(n),
    )


def test_interleave_puts_each_prompts_clean_then_noisy_responses_together():
    clean = _rollout(["c00", "c01", "c10", "c11"], 2, 2)
    noisy = _rollout(["n00", "n10"], 1, 3)
    out = B.interleave_rollouts(clean, noisy, pad_id=-1)
    assert out.texts == ["c00", "c01", "n00", "c10", "c11", "n10"]
    assert out.n == 3 and out.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    assert out.response_ids[0].tolist() == [0, 1, -1] and out.response_ids[2].tolist() == [0, 1, 2]
    assert out.response_mask[1].tolist() == [1, 1, 0]
    only = B.interleave_rollouts(None, noisy, pad_id=-1)
    assert only.texts == ["n00", "n10"] and only.n == 1


def parity_reward(completions, answers, **columns):
    return [float(len(c) % 2 == 0) for c in completions]


def test_noisyrollout_with_papo_g_trains_on_clean_images(tmp_path):
    cfg = load_config(
        None,
        [
            "objective.name=papo_g",
            "objective.noisy_frac=0.5",
            "objective.noisy_anneal=none",
            "model.name_or_path=tiny:qwen2_vl",
            "data.limit=24",
            "data.eval_size=0",
            "train.steps=2",
            "train.prompts_per_step=2",
            "rollout.n=4",
            "rollout.max_new_tokens=5",
            f"train.out_dir={tmp_path}",
            "logging.progress=false",
            "optim.lr=1e-3",
            "train.samples_every=0",
            "train.save_every=0",
        ],
    )
    trainer = Trainer(cfg, reward_fn=RewardRunner(parity_reward, num_workers=0))
    calls = []
    generate = trainer.rollout_backend.generate

    def spy(prompts, **kw):
        calls.append((prompts, kw["n"]))
        return generate(prompts, **kw)

    trainer.rollout_backend.generate = spy
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    history = trainer.train()
    assert len(history) == 2 and all(math.isfinite(m["loss/total"]) for m in history)
    assert "loss/perception_kl" in history[0]
    # One decode per step: prompt i's clean copy (2 responses), then its noised copy (2).
    assert [n for _, n in calls] == [[2, 2, 2, 2], [2, 2, 2, 2]]
    both = calls[1][0]
    clean_pixels = both.select([0, 2]).pixels["pixel_values"]
    noisy_pixels = both.select([1, 3]).pixels["pixel_values"]
    step = trainer._last_step
    assert len(step.batch) == 2 * 4
    # Scored on the clean image: the step's pixels are the clean rollout's, not the noisy ones.
    assert torch.equal(step.prompts.pixels["pixel_values"], clean_pixels)
    assert not torch.allclose(clean_pixels, noisy_pixels)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
