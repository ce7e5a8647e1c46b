"""A run's checkpoint as a model: for evaluation, and ``vispo export`` (a Hugging Face folder)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from vispo.train.checkpoint import checkpoint_dirs, latest_checkpoint
from vispo.train.config import Config, build_config


def run_config(run_dir: str | Path) -> Config:
    """The run's :class:`~vispo.train.config.Config`, rebuilt from its ``config.json``."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vispo run folder (no config.json)")
    tree = json.loads(cfg_path.read_text())
    tree.setdefault("objective", {})
    tree["objective"]["name"] = tree["objective"].get("name", "grpo")
    return build_config(tree)


def load_run_checkpoint(run_dir: str | Path, *, step: int | None = None, merge_lora: bool = True):
    """``(model, processor, config, checkpoint_dir)`` of a run's checkpoint (latest by default).

    The run's model is rebuilt from its config (architecture, LoRA wrapping, ...) and the
    checkpoint's full ``state_dict`` is loaded strictly; LoRA adapters are merged when
    ``merge_lora``.
    """
    from vispo.train.setup import load_model

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
    else:
        ckpt = next((c for c in checkpoint_dirs(run_dir) if c.name == f"step-{step:06d}"), None)
    if ckpt is None:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoint{'' if step is None else f' at step {step}'}"
        )
    model, processor = load_model(cfg.model)
    try:
        model.load_state_dict(load_file(str(ckpt / "weights.safetensors")), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"{ckpt}: weights do not match the run's model: {e}") from None
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), processor, cfg, ckpt


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Write the checkpoint as a Hugging Face folder (safetensors, processor, chat template)."""
    model, processor, _, _ = load_run_checkpoint(run_dir, step=step, merge_lora=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
