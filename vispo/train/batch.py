"""Assembling one step's rollouts: prompts, responses, rewards, advantages, image variants.

The data flow of design.md, minus the update: sample prompts -> roll out n responses each on
the clean image -> score rewards -> group advantages (DAPO keeps only informative groups,
generating more rounds until the batch is full) -> draw each prompt's perturbations (PAPO
mask, CPPO I+ / I-) from the run's seeded generator -> their pixel inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image

from vispo.algos import (
    advantage_estimate,
    dynamic_sampling_keep,
    needs_batch_statistics,
    zero_std_group_fraction,
)
from vispo.models.scoring import (
    PromptBatch,
    ScoringBatch,
    build_scoring_batch,
    encode_prompts,
    pixel_inputs,
)
from vispo.rollout.hf import Rollout
from vispo.vision import (
    gaussian_noise,
    info_preserving,
    info_removing,
    random_patch_mask,
    resize_to_budget,
)


@dataclasses.dataclass
class Group:
    """One prompt and its n rollouts."""

    sample: object
    images: list[Image.Image]
    messages: list[dict]
    response_ids: list[torch.Tensor]  # n tensors of real tokens (no padding)
    texts: list[str]
    rewards: torch.Tensor  # [n]
    components: dict[str, torch.Tensor]  # name -> [n]
    truncated: torch.Tensor  # [n] bool
    key: tuple[int, ...] = ()  # (step, round, position in the global batch): seeds its draws


@dataclasses.dataclass
class StepBatch:
    """Everything the update needs for one step."""

    groups: list[Group]
    prompts: PromptBatch
    batch: ScoringBatch
    rewards: torch.Tensor  # [B]
    advantages: torch.Tensor  # [B]
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> pixel dict
    variant_images: dict[str, list[list[Image.Image]]] = dataclasses.field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.groups[0].texts)


def image_budget(processor) -> tuple[int, int, int] | None:
    """(factor, min_pixels, max_pixels) of a Qwen-VL-style image processor, else None."""
    ip = getattr(processor, "image_processor", None)
    size = getattr(ip, "size", None)
    patch, merge = getattr(ip, "patch_size", None), getattr(ip, "merge_size", None)
    lo = getattr(size, "shortest_edge", None) if size is not None else None
    hi = getattr(size, "longest_edge", None) if size is not None else None
    if None in (patch, merge, lo, hi):
        return None
    return patch * merge, lo, hi


def prepare_image(image: Image.Image, budget: tuple[int, int, int] | None) -> Image.Image:
    """Resize once to the processor's pixel grid, so every variant keeps that exact size."""
    if budget is None:
        return image
    factor, lo, hi = budget
    return resize_to_budget(image, factor=factor, min_pixels=lo, max_pixels=hi)


def pad_responses(responses: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad 1-D token tensors to ``[B, T]`` ids and float mask."""
    T = max(1, max(int(r.numel()) for r in responses))
    ids = torch.full((len(responses), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(responses), T)
    for i, r in enumerate(responses):
        ids[i, : r.numel()] = r
        mask[i, : r.numel()] = 1.0
    return ids, mask


def groups_from_rollout(
    samples, images, messages, rollout, rewards, components, keys
) -> list[Group]:
    n = rollout.n
    groups = []
    for i, sample in enumerate(samples):
        rows = range(i * n, (i + 1) * n)
        groups.append(
            Group(
                sample=sample,
                images=images[i],
                messages=messages[i],
                response_ids=[
                    rollout.response_ids[r][rollout.response_mask[r].bool()] for r in rows
                ],
                texts=[rollout.texts[r] for r in rows],
                rewards=rewards[i * n : (i + 1) * n],
                components={k: v[i * n : (i + 1) * n] for k, v in components.items()},
                truncated=rollout.truncated[i * n : (i + 1) * n],
                key=keys[i],
            )
        )
    return groups


def keep_informative(groups: list[Group], low: float, high: float) -> list[bool]:
    """DAPO filter per group: mean accuracy strictly inside (low, high)."""
    acc = torch.cat([g.components.get("accuracy", g.rewards) for g in groups])
    ids = torch.arange(len(groups)).repeat_interleave(len(groups[0].texts))
    keep = dynamic_sampling_keep(acc, ids, low=low, high=high)
    n = len(groups[0].texts)
    return [bool(keep[i * n]) for i in range(len(groups))]


def assemble(
    processor,
    groups: list[Group],
    *,
    prompts: PromptBatch | None,
    scale: str,
    eps: float,
    estimator: str = "grpo",
    gather_rows=None,
) -> StepBatch:
    """Pad responses, build the scoring batch and the advantages of the kept groups.

    ``prompts``: the encoded prompts when they are exactly these groups' (one full round);
    otherwise the kept prompts are encoded again. ``gather_rows`` (``Dist.gather_rows``): under
    several ranks, an estimator whose statistics span the batch (REINFORCE++'s whitening, the
    ``batch`` scale) is computed over every rank's rows, as one process would, and this rank
    keeps its own.
    """
    if prompts is None:
        prompts = encode_prompts(
            processor, [g.messages for g in groups], [g.images for g in groups]
        )
    n = len(groups[0].texts)
    ids, mask = pad_responses([r for g in groups for r in g.response_ids], prompts.pad_token_id)
    batch = build_scoring_batch(prompts, ids, repeats=n, response_mask=mask)
    rewards = torch.cat([g.rewards for g in groups])
    group_ids = torch.arange(len(groups)).repeat_interleave(n)
    lengths = mask.sum(-1).to(rewards.dtype)
    start = 0
    if gather_rows is not None and needs_batch_statistics(estimator, scale):
        # Group ids are per rank: made unique across ranks by the rank that owns the row.
        local = torch.stack([rewards.float(), group_ids.float(), lengths.float()], dim=1)
        everything, owner, start = gather_rows(local)
        rewards_all, lengths_all = everything[:, 0], everything[:, 2]
        group_all = everything[:, 1].long() + owner * (everything.shape[0] + 1)
    else:
        rewards_all, group_all, lengths_all = rewards, group_ids, lengths
    advantages = advantage_estimate(
        estimator, rewards_all, group_all, lengths=lengths_all, scale=scale, eps=eps
    )[start : start + rewards.numel()]
    return StepBatch(
        groups=groups, prompts=prompts, batch=batch, rewards=rewards, advantages=advantages
    )


def prompt_rng(seed: int, key: tuple[int, ...], stream: int) -> np.random.Generator:
    """The generator of one prompt's draws: a function of (run seed, step, round, position in
    the global batch, stream), so the draws do not depend on how prompts are split into ranks
    or batches."""
    return np.random.default_rng([seed, *key, stream])


def masked_variant(
    clean: Image.Image,
    original: Image.Image | None,
    *,
    budget: tuple[int, int, int] | None,
    patch_size: int,
    ratio: float,
    rng: np.random.Generator,
) -> Image.Image:
    """PAPO's masked image for one clean (already resized) image.

    With ``original`` (the image as loaded, before :func:`prepare_image`), the patches are
    drawn on it and the result is resized with ``budget`` like the clean image: the reference
    order, patches of ``patch_size`` pixels in the original image. Without it, the patches are
    drawn on ``clean``: ``patch_size`` pixels at the model's resolution.
    """
    if original is None:
        return random_patch_mask(clean, patch_size=patch_size, ratio=ratio, rng=rng)
    masked = prepare_image(
        random_patch_mask(original, patch_size=patch_size, ratio=ratio, rng=rng), budget
    )
    if masked.size != clean.size:
        raise ValueError(
            f"the masked image resized to {masked.size} but the clean one is {clean.size}: pass "
            "the budget the clean images were prepared with"
        )
    return masked


def draw_variants(
    step: StepBatch,
    processor,
    names: list[str],
    seed: int,
    *,
    mask_ratio: float,
    mask_patch_size: int,
    include_blur: bool,
    mask_order: str = "after-resize",
    budget: tuple[int, int, int] | None = None,
) -> None:
    """Draw each prompt's perturbed images (shared by its rollouts) and their pixel inputs.

    Each prompt draws from :func:`prompt_rng`; per image the order is mask, then I+, then I-.
    ``mask_order="before-resize"`` (the PAPO reference) masks the sample's image as loaded and
    then resizes it with :func:`prepare_image` and ``budget`` (the clean image's resize, so the
    sizes match); ``"after-resize"`` masks the resized image the rollouts saw.
    """
    if not names:
        return
    images = {name: [] for name in names}
    if mask_order not in ("before-resize", "after-resize"):
        raise ValueError(
            f"mask_order must be 'before-resize' or 'after-resize', got {mask_order!r}"
        )
    for g in step.groups:
        rng = prompt_rng(seed, g.key, 0)
        per = {name: [] for name in names}
        raw = (
            g.sample.load_images()
            if "mask" in per and mask_order == "before-resize"
            else [None] * len(g.images)
        )
        for img, original in zip(g.images, raw):
            if "mask" in per:
                per["mask"].append(
                    masked_variant(
                        img,
                        original,
                        budget=budget,
                        patch_size=mask_patch_size,
                        ratio=mask_ratio,
                        rng=rng,
                    )
                )
            if "pos" in per:
                per["pos"].append(info_preserving(img, rng, include_blur=include_blur)[0])
            if "neg" in per:
                per["neg"].append(info_removing(img, rng)[0])
        for name in names:
            images[name].append(per[name])
    step.variant_images = images
    step.variants = {
        name: pixel_inputs(processor, images[name], reference=step.prompts) for name in names
    }


def noised_images(
    images: list[list[Image.Image]],
    keys: list[tuple[int, ...]],
    seed: int,
    *,
    signal: float,
    noise_std: float,
) -> list[list[Image.Image]]:
    """NoisyRollout's rollout images: each image scaled by ``signal`` and given Gaussian noise of
    std ``noise_std`` (in units of the [0, 1] pixel range), one draw per prompt shared by its noisy
    rollouts, from :func:`prompt_rng` stream 2 (0: the scoring variants, 1: rollout seeds)."""
    out = []
    for per_prompt, key in zip(images, keys):
        rng = prompt_rng(seed, key, 2)
        noisy = []
        for img in per_prompt:
            scaled = np.rint(np.asarray(img.convert("RGB"), dtype=np.float64) * signal)
            noisy.append(
                gaussian_noise(Image.fromarray(scaled.astype(np.uint8)), rng, strength=noise_std)
            )
        out.append(noisy)
    return out


def interleave_rollouts(clean: Rollout | None, noisy: Rollout, pad_id: int) -> Rollout:
    """One rollout whose group ``i`` is prompt ``i``'s clean responses, then its noisy ones."""
    parts = [r for r in (clean, noisy) if r is not None]
    P = len(noisy) // noisy.n
    T = max(r.response_ids.shape[1] for r in parts)
    rows = [(r, i * r.n + j) for i in range(P) for r in parts for j in range(r.n)]

    def stack(name: str, value=None) -> torch.Tensor:
        ts = [getattr(r, name)[k] for r, k in rows]
        if value is not None:
            ts = [torch.nn.functional.pad(t, (0, T - t.shape[0]), value=value) for t in ts]
        return torch.stack(ts)

    n = sum(r.n for r in parts)
    return Rollout(
        response_ids=stack("response_ids", pad_id),
        response_mask=stack("response_mask", 0.0),
        lengths=stack("lengths"),
        stopped=stack("stopped"),
        texts=[r.texts[k] for r, k in rows],
        n=n,
        prompt_index=torch.arange(P).repeat_interleave(n),
    )


def mixed_rollout(
    generate,
    processor,
    prompts: PromptBatch,
    messages: list,
    images: list[list[Image.Image]],
    keys: list[tuple[int, ...]],
    *,
    seed: int,
    n: int,
    n_noisy: int,
    signal: float,
    noise_std: float,
    one_decode: bool = False,
) -> Rollout:
    """NoisyRollout: ``n - n_noisy`` responses per prompt on the clean image, ``n_noisy`` on a
    noised copy (``generate(prompts, keys, n)`` is the trainer's rollout). The responses are later
    scored and updated against the clean image, like every other.

    ``one_decode`` (the rollout takes one count per prompt): the clean and the noised prompts go
    through one call, prompt i's clean copy then its noised copy, with ``n - n_noisy`` and
    ``n_noisy`` responses, so the rows come out in :func:`interleave_rollouts`' layout. Each
    copy keeps its key (the noised one ``(*key, 1)``), so a rollout seeded per key gives the
    same responses either way; an unseeded one draws from the same distribution.
    """
    if n_noisy <= 0:
        return generate(prompts, keys, n)
    noisy_images = noised_images(images, keys, seed, signal=signal, noise_std=noise_std)
    noisy_keys = [(*k, 1) for k in keys]
    if one_decode and n_noisy < n:
        both = encode_prompts(
            processor,
            [m for m in messages for _ in range(2)],
            [im for pair in zip(images, noisy_images) for im in pair],
        )
        rollout = generate(
            both,
            [k for pair in zip(keys, noisy_keys) for k in pair],
            [n - n_noisy, n_noisy] * len(keys),
        )
        return dataclasses.replace(
            rollout, n=n, prompt_index=torch.arange(len(keys)).repeat_interleave(n)
        )
    clean = generate(prompts, keys, n - n_noisy) if n_noisy < n else None
    noisy = generate(encode_prompts(processor, messages, noisy_images), noisy_keys, n_noisy)
    return interleave_rollouts(clean, noisy, prompts.pad_token_id)


def trim_left_padding(prompts: PromptBatch) -> PromptBatch:
    """Drop the columns that are padding in every row (a single prompt: all its padding)."""
    real = prompts.attention_mask.bool().any(0)
    first = int(real.nonzero()[0])
    if first == 0:
        return prompts
    return dataclasses.replace(
        prompts,
        input_ids=prompts.input_ids[:, first:],
        attention_mask=prompts.attention_mask[:, first:],
        token_inputs={k: v[:, first:] for k, v in prompts.token_inputs.items()},
    )


def rollout_metrics(step: StepBatch, max_new_tokens: int) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([float(r.numel()) for g in step.groups for r in g.response_ids])
    truncated = torch.cat([g.truncated for g in step.groups]).float()
    n = step.n
    group_ids = torch.arange(len(step.groups)).repeat_interleave(n)
    out = {
        "reward/mean": step.rewards.mean(),
        "reward/std": step.rewards.std() if step.rewards.numel() > 1 else torch.tensor(0.0),
        "frac_zero_std_groups": zero_std_group_fraction(step.rewards, group_ids),
        "response_length/mean": lengths.mean(),
        "response_length/max": lengths.max(),
        "response_length/clip_ratio": truncated.mean(),
    }
    for name in step.groups[0].components:
        values = torch.cat([g.components[name] for g in step.groups])
        out[f"reward/{name}/mean"] = values.mean()
    if "accuracy" in step.groups[0].components:
        out["accuracy/mean"] = out["reward/accuracy/mean"]
    return out
