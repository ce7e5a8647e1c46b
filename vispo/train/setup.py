"""Resolving a config into objects: the policy, the data, the reward."""

from __future__ import annotations

from pathlib import Path

from vispo.data import BUILTIN_DATASETS, filter_by_prompt_length, load_builtin, load_samples
from vispo.rewards import REWARDS, Limits, RewardRunner

BUILTIN_MODELS_DIR = Path(__file__).resolve().parent.parent / "assets"


def load_model(mcfg):
    """(model, processor) for ``model.name_or_path``, with freezing / LoRA / checkpointing."""
    from vispo.models.adapt import apply_lora, enable_gradient_checkpointing, freeze_vision_tower
    from vispo.models.loading import load_policy
    from vispo.models.tiny import build_tiny_vlm

    name = mcfg.name_or_path
    if name.startswith("tiny:"):
        model, processor = build_tiny_vlm(name.split(":", 1)[1], seed=mcfg.seed)
    elif name.startswith("builtin:"):
        path = BUILTIN_MODELS_DIR / name.split(":", 1)[1]
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name_or_path={name!r}: the built-in model is missing at {path}; "
                "rebuild it with `make tiny-model`"
            )
        model, processor = load_policy(str(path), dtype=mcfg.dtype)
    else:
        model, processor = load_policy(
            name, dtype=mcfg.dtype, trust_remote_code=mcfg.trust_remote_code
        )
    if mcfg.freeze_vision:
        freeze_vision_tower(model)
    if mcfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if mcfg.lora:
        model = apply_lora(model, r=mcfg.lora_r, alpha=mcfg.lora_alpha)
    return model, processor


def load_split(dcfg, split: str, limit):
    """Samples of ``split`` from a built-in data set or a local source (``data.*`` fields)."""
    if dcfg.name in BUILTIN_DATASETS:
        options = {"n": dcfg.synthetic_size} if dcfg.name == "synthetic" else {}
        return load_builtin(dcfg.name, split=split, limit=limit, **options)
    # validate_images: an undecodable image (corrupt, truncated, empty, over the pixel guard)
    # is a bad sample, skipped and counted or raised per data.on_error, not a crash later on.
    return load_samples(
        dcfg.name,
        split=split,
        columns=dcfg.columns or None,
        image_root=dcfg.image_root,
        on_error=dcfg.on_error,
        limit=limit,
        validate_images=True,
    )


def load_train_data(dcfg, processor, template, *, log=print):
    data = load_split(dcfg, dcfg.split, dcfg.limit)
    if getattr(data, "n_skipped", 0):
        log(f"data: skipped {data.n_skipped} bad samples ({dict(data.skipped)})")
    kept, dropped = filter_by_prompt_length(
        data, processor, template, dcfg.max_prompt_length, on_error=dcfg.on_error
    )
    refused = kept.skipped.get("processor_error", 0)
    if refused:
        log(f"data: skipped {refused} samples the processor refuses ({kept.errors[-1]})")
    if kept.neutralised:
        log(
            f"data: neutralised chat-control/image tokens in the text of {len(kept.neutralised)}"
            " samples (now plain text)"
        )
    if dropped:
        log(f"data: dropped {dropped} prompts longer than {dcfg.max_prompt_length} tokens")
    if len(kept) == 0:
        raise ValueError(f"data.name={dcfg.name!r}: no usable training samples")
    return kept


def load_eval_data(dcfg):
    if dcfg.eval_size <= 0:
        return None
    return load_split(dcfg, dcfg.eval_split, dcfg.eval_size)


def load_reward(rcfg) -> RewardRunner:
    """The run's reward; user reward files run sandboxed in a worker unless
    ``reward.num_workers`` says otherwise (a hang or crash there must not stop training)."""
    workers = rcfg.num_workers
    if workers is None:
        workers = 0 if rcfg.name in REWARDS else 1
    limits = Limits(
        env=tuple(rcfg.env),
        memory_mb=rcfg.memory_mb,
        cpu_s=rcfg.cpu_s,
        file_size_mb=rcfg.file_size_mb,
        max_processes=rcfg.max_processes,
        user=rcfg.user,
        network=rcfg.network,
    )
    return RewardRunner(
        rcfg.name,
        num_workers=workers,
        timeout_s=rcfg.timeout_s,
        limits=limits,
        max_consecutive_failures=rcfg.max_consecutive_failures,
    )
