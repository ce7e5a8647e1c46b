"""Turning what a user names on the command line into a model to evaluate.

A model spec is one of:

* a vispo run folder (``config.json`` + ``checkpoints/``): the run's model is rebuilt from
  its config and the checkpoint's ``weights.safetensors`` is loaded into it (LoRA adapters
  merged) by :func:`vispo.train.export.load_run_checkpoint`, which ``vispo export`` uses too;
* a local Hugging Face model folder (e.g. one written by ``vispo export``);
* ``builtin:<name>`` (the small VLM shipped with vispo) or ``tiny:<arch>`` (a random tiny
  model, for tests).

Nothing is downloaded: a name that is none of these is an error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vispo.train.export import load_run_checkpoint


class ModelSpecError(ValueError):
    """A model spec names nothing loadable (the message says what was expected)."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to evaluate.

    Attributes:
        model, processor: the policy (eval mode).
        spec: what the user named.
        label: a short name for tables (the run or folder name).
        config: the run's :class:`vispo.train.config.Config` when ``spec`` is a run folder.
        checkpoint: the checkpoint folder loaded, for runs.
        step: the checkpoint's step, for runs.
    """

    model: object
    processor: object
    spec: str
    label: str
    config: object | None = None
    checkpoint: Path | None = None
    step: int | None = None

    @property
    def identity(self) -> dict:
        """What determines the weights (recorded with results, checked on resume)."""
        return {
            "spec": self.spec,
            "checkpoint": None if self.checkpoint is None else self.checkpoint.name,
        }


def is_run_dir(path: str | Path) -> bool:
    """True for a vispo run folder: a ``config.json`` with the trainer's sections."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        tree = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(tree, dict) and "train" in tree and "model" in tree


def load_model_spec(spec: str, *, step: int | None = None, dtype: str = "float32") -> LoadedModel:
    """Load what ``spec`` names (module docstring); ``step`` picks a run's checkpoint."""
    from vispo.train.config import ModelConfig
    from vispo.train.setup import load_model

    spec = str(spec)
    path = Path(spec)
    if path.is_dir() and is_run_dir(path):
        model, processor, cfg, ckpt = load_run_checkpoint(path, step=step)
        step_no = int(ckpt.name.split("-", 1)[1])
        return LoadedModel(
            model, processor, spec, path.resolve().name, config=cfg, checkpoint=ckpt, step=step_no
        )
    if step is not None:
        raise ModelSpecError(f"--step applies to run folders only; {spec!r} is not one")
    if spec.startswith(("tiny:", "builtin:")):
        model, processor = load_model(ModelConfig(name_or_path=spec, dtype=dtype))
        return LoadedModel(model, processor, spec, spec.replace(":", "-"))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(
                f"model {spec!r}: the folder has no config.json (expected a Hugging Face model "
                "folder or a vispo run folder)"
            )
        model, processor = load_model(ModelConfig(name_or_path=spec, dtype=dtype))
        return LoadedModel(model, processor, spec, path.resolve().name)
    raise ModelSpecError(
        f"model {spec!r}: not a folder, 'builtin:<name>' or 'tiny:<arch>' (hub ids are not "
        "downloaded by vispo eval: download the model first and pass its folder)"
    )
