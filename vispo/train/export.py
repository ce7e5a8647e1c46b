"""``vispo export``: a run's checkpoint as a standard Hugging Face model folder."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from vispo.train.checkpoint import checkpoint_dirs, latest_checkpoint
from vispo.train.config import build_config


def export_run(run_dir: str | Path, out_dir: str | Path, *, step: int | None = None) -> Path:
    """Rebuild the run's model, load the checkpoint's weights, merge LoRA, save_pretrained."""
    from vispo.train.setup import load_model as load_policy_from_config

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vispo run folder (no config.json)")
    tree = json.loads(cfg_path.read_text())
    tree["objective"]["name"] = tree["objective"].get("name", "grpo")
    cfg = build_config(tree)
    if step is None:
        ckpt = latest_checkpoint(run_dir)
    else:
        ckpt = next((c for c in checkpoint_dirs(run_dir) if c.name == f"step-{step:06d}"), None)
    if ckpt is None:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoint{'' if step is None else f' at step {step}'}"
        )
    model, processor = load_policy_from_config(cfg.model)
    model.load_state_dict(load_file(str(ckpt / "weights.safetensors")), strict=True)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
