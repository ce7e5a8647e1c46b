"""A run's checkpoint as a model: for evaluation, and ``vispo export`` (a Hugging Face folder).

``vispo export RUN OUT`` writes a folder that plain transformers loads with nothing from vispo
imported, also on a machine without torchvision::

    proc = AutoProcessor.from_pretrained(OUT)
    model = AutoModelForImageTextToText.from_pretrained(OUT)
    inputs = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                      return_dict=True, return_tensors="pt")
    model.generate(**inputs)      # greedy, the run's length cap: vispo eval's greedy answer

It holds the weights (safetensors; LoRA adapters merged), the processor
(:func:`vispo.models.processors.save_portable_processor`), the chat template, a generation
config (greedy, the run's ``rollout.max_new_tokens``, its stop and suppressed tokens: the rules
of vispo's own greedy evaluation) and a model card ``README.md``. ``--adapter-only`` writes a
LoRA run's adapter alone in PEFT format; ``--push-to-hub`` uploads the folder with
``huggingface_hub``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from vispo.train.checkpoint import CheckpointError, checkpoint_dirs, read_weights
from vispo.train.config import Config, build_config


class ExportError(ValueError):
    """An expected export failure (wrong step, not a LoRA run, bad repo id, ...)."""


def run_config(run_dir: str | Path) -> Config:
    """The run's :class:`~vispo.train.config.Config`, rebuilt from its ``config.json``."""
    cfg_path = Path(run_dir) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a vispo run folder (no config.json)")
    try:
        tree = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"{cfg_path}: not readable JSON ({e})") from None
    tree.setdefault("objective", {})
    tree["objective"]["name"] = tree["objective"].get("name", "grpo")
    return build_config(tree)


def checkpoint_step(ckpt: Path) -> int:
    """The step of a checkpoint folder ``step-000123``."""
    return int(ckpt.name.split("-", 1)[1])


def select_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """The run's checkpoint at ``step`` (latest when None).

    Raises ``FileNotFoundError`` when the run has no complete checkpoint, or when none is at
    ``step`` (the message lists the steps that exist).
    """
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(
            f"{run_dir}: no complete checkpoint (checkpoints/step-*/state.json); the run saved "
            "none yet (train.save_every, or it stopped before its first save)"
        )
    if step is None:
        return dirs[-1]
    for ckpt in dirs:
        if checkpoint_step(ckpt) == step:
            return ckpt
    steps = ", ".join(str(checkpoint_step(c)) for c in dirs)
    raise FileNotFoundError(f"{run_dir}: no checkpoint at step {step}; steps with one: {steps}")


def _load_weights_into(model, weights: dict, ckpt: Path) -> None:
    """Load a checkpoint's weights strictly. A LoRA run's checkpoint may hold only the
    trainable weights: then the missing keys must be exactly frozen parameters, which the
    rebuilt model already has from its base."""
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{ckpt}: weights do not match the run's model: {e}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen |= {n for n, _ in model.named_buffers()}
    lora_only = hasattr(model, "peft_config") and missing and set(missing) <= frozen
    if unexpected or (missing and not lora_only):
        raise CheckpointError(
            f"{ckpt}: weights do not match the run's model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


def load_run_checkpoint(run_dir: str | Path, *, step: int | None = None, merge_lora: bool = True):
    """``(model, processor, config, checkpoint_dir)`` of a run's checkpoint (latest by default).

    The run's model is rebuilt from its config (architecture, LoRA wrapping, ...) and the
    checkpoint's weights are loaded strictly (read through
    :func:`vispo.train.checkpoint.read_weights`); LoRA adapters are merged when ``merge_lora``.
    A missing or unreadable checkpoint fails before the model is built.
    """
    from vispo.train.setup import load_model

    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ckpt = select_checkpoint(run_dir, step)
    weights = read_weights(ckpt)
    model, processor = load_model(cfg.model)
    _load_weights_into(model, weights, ckpt)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model.eval(), processor, cfg, ckpt


@dataclasses.dataclass
class ExportResult:
    """What ``export_run`` wrote: the folder, the checkpoint and its step, and the hub URL."""

    path: Path
    checkpoint: Path
    step: int
    adapter_only: bool = False
    url: str | None = None


def generation_config_for(model, processor, cfg: Config):
    """Greedy decoding with the rules of vispo's evaluation: the run's length cap, its stop
    tokens, and the image/video placeholders suppressed."""
    from transformers import GenerationConfig

    from vispo.rollout.hf import multimodal_token_ids, stop_token_ids

    eos = stop_token_ids(model, processor)
    pad = processor.tokenizer.pad_token_id
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=cfg.rollout.max_new_tokens,
        eos_token_id=eos if len(eos) > 1 else eos[0],
        pad_token_id=pad if pad is not None else eos[0],
        bos_token_id=None,
        suppress_tokens=multimodal_token_ids(processor) or None,
        remove_invalid_values=True,
    )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    step: int | None = None,
    adapter_only: bool = False,
) -> ExportResult:
    """Write checkpoint ``step`` (latest by default) of a run as a Hugging Face folder.

    Full export: merged weights, portable processor, chat template, ``generation_config.json``
    and ``README.md``. ``adapter_only``: a LoRA run's adapter in PEFT format
    (``adapter_config.json`` + ``adapter_model.safetensors``) and ``README.md``.
    """
    from vispo.models.processors import save_portable_processor

    cfg = run_config(run_dir)
    if adapter_only and not cfg.model.lora:
        raise ExportError(
            f"{run_dir}: --adapter-only needs a LoRA run (model.lora=true); this run trained "
            "all weights: export it without --adapter-only"
        )
    model, processor, cfg, ckpt = load_run_checkpoint(
        run_dir, step=step, merge_lora=not adapter_only
    )
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    step_no = checkpoint_step(ckpt)
    if adapter_only:
        model.peft_config["default"].base_model_name_or_path = _base_model_reference(cfg)
        model.save_pretrained(out, safe_serialization=True)
    else:
        model.generation_config = generation_config_for(model, processor, cfg)
        model.save_pretrained(out, safe_serialization=True)
        save_portable_processor(processor, out)
    (out / "README.md").write_text(
        model_card(Path(run_dir), cfg, ckpt, adapter_only=adapter_only), encoding="utf-8"
    )
    return ExportResult(out, ckpt, step_no, adapter_only=adapter_only)


def _base_model_reference(cfg: Config) -> str:
    """The base model as a loadable reference: the built-in model's folder, else as named."""
    name = cfg.model.name_or_path
    if name.startswith("builtin:"):
        from vispo.train.setup import BUILTIN_MODELS_DIR

        return str(BUILTIN_MODELS_DIR / name.split(":", 1)[1])
    return name


# --- model card -------------------------------------------------------------------------------


def _held_out_results(run_dir: Path, ckpt: Path) -> list[tuple[str, str]]:
    """(what, value) rows: the trainer's held-out accuracy up to the checkpoint's step, and
    any ``vispo eval`` of this checkpoint stored in the run folder."""
    rows: list[tuple[str, str]] = []
    step = checkpoint_step(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError):
        state = {}
    ev = dict(state.get("eval") or {})
    points = []  # (step, accuracy) of the periodic held-out evaluations up to this step
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if "eval/accuracy_before" in rec:
                ev.setdefault("accuracy_before", rec["eval/accuracy_before"])
            # The final evaluation is logged after the last checkpoint may have been written.
            if "eval/accuracy_after" in rec and rec["step"] == step:
                ev.setdefault("accuracy_after", rec["eval/accuracy_after"])
            if "eval/accuracy" in rec and rec["step"] <= step:
                points.append((rec["step"], rec["eval/accuracy"]))
    if "accuracy_before" in ev:
        rows.append(("held-out accuracy before RL (greedy)", f"{ev['accuracy_before']:.3f}"))
    if "accuracy_after" in ev:
        rows.append(
            (f"held-out accuracy after RL, step {step} (greedy)", f"{ev['accuracy_after']:.3f}")
        )
    elif points:
        s, acc = points[-1]
        rows.append((f"held-out accuracy at step {s} (greedy)", f"{acc:.3f}"))
    summary = run_dir / "eval" / "eval.json"
    if summary.is_file():
        try:
            result = json.loads(summary.read_text())
        except json.JSONDecodeError:
            result = {}
        if (result.get("model") or {}).get("checkpoint") == ckpt.name:
            for mode, info in (result.get("modes") or {}).items():
                benches = (info.get("summary") or {}).get("benchmarks") or {}
                for bench, value in benches.items():
                    score, n = value.get("score"), value.get("n")
                    if isinstance(score, (int, float)):
                        rows.append(
                            (f"vispo eval: {bench}, {n} questions ({mode})", f"{score:.3f}")
                        )
    return rows


def _held_out_set(cfg: Config) -> str:
    """Which questions the trainer's held-out accuracy is on (docs/data.md)."""
    from vispo.data import BUILTIN_DATASETS

    d = cfg.data
    if d.eval_size <= 0:
        return "The run had no held-out evaluation (data.eval_size=0)."
    if getattr(d, "eval_name", None):
        where = f"`{d.eval_name}` (split `{d.eval_split}`)"
    elif d.name in BUILTIN_DATASETS:
        where = f"`{d.name}` split `{d.eval_split}`"
    else:
        where = (
            f"`{d.name}` split `{d.eval_split}`, or, where it has none apart from the training "
            "rows, a fixed-seed slice of the training rows held out of training"
        )
    return f"Held-out set: at most {d.eval_size} questions of {where}; greedy decoding."


def model_card(run_dir: Path, cfg: Config, ckpt: Path, *, adapter_only: bool = False) -> str:
    """``README.md`` of an exported folder: base model, objective and settings, data, steps,
    held-out results and how to load it."""
    from vispo.data import get_template

    step = checkpoint_step(ckpt)
    base = cfg.model.name_or_path
    hub_base = re.fullmatch(r"[\w.\-]+/[\w.\-]+", base) and not Path(base).exists()
    objective = {
        k: v for k, v in dataclasses.asdict(cfg.objective).items() if not isinstance(v, dict)
    }
    try:
        template = get_template(cfg.data.template)
        prompt = template.text
    except (ValueError, TypeError):
        prompt = str(cfg.data.template)
    tuning = (
        f"LoRA r={cfg.model.lora_r} alpha={cfg.model.lora_alpha}"
        if cfg.model.lora
        else "all weights"
    ) + (", vision tower frozen" if cfg.model.freeze_vision else "")
    front = ["---", "library_name: " + ("peft" if adapter_only else "transformers")]
    front += ["pipeline_tag: image-text-to-text", "tags:", "- vispo", "- rlvr"]
    front.append(f"- {cfg.objective.name}")
    if hub_base:
        front.append(f"base_model: {base}")
    front.append("---")
    lines = front + [
        "",
        f"# {run_dir.resolve().name} (vispo, {cfg.objective.name}, step {step})",
        "",
        f"Trained with vispo (reinforcement learning with verifiable "
        f"rewards): objective `{cfg.objective.name}` on `{cfg.data.name}`, exported from "
        f"checkpoint `{ckpt.name}` of a {cfg.train.steps}-step run."
        + (" This folder holds the LoRA adapter only (PEFT format)." if adapter_only else ""),
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| fine-tuning | {tuning} |",
        f"| objective | `{cfg.objective.name}` |",
        f"| data | `{cfg.data.name}` (split `{cfg.data.split}`"
        + (f", first {cfg.data.limit}" if cfg.data.limit else "")
        + ") |",
        f"| reward | `{cfg.reward.name}` |",
        f"| steps | {step} of {cfg.train.steps} |",
        f"| prompts per step x responses | {cfg.train.prompts_per_step} x {cfg.rollout.n} |",
        f"| learning rate | {cfg.optim.lr:g} ({cfg.optim.schedule}) |",
        f"| sampling | temperature {cfg.rollout.temperature:g}, top_p {cfg.rollout.top_p:g}, "
        f"at most {cfg.rollout.max_new_tokens} new tokens |",
        f"| seed | {cfg.train.seed} |",
        "",
        "Objective settings:",
        "",
        "| field | value |",
        "|---|---|",
    ]
    lines += [f"| `{k}` | `{v}` |" for k, v in objective.items()]
    results = _held_out_results(run_dir, ckpt)
    lines += ["", "## Held-out results", "", _held_out_set(cfg), ""]
    if results:
        lines += ["| | accuracy |", "|---|---|"] + [f"| {a} | {b} |" for a, b in results]
    else:
        lines.append("No held-out evaluation was recorded for this checkpoint.")
    lines += [
        "",
        "## Prompt",
        "",
        "The model was trained on user turns rendered from this template (`question` is the "
        "data set's question; an image goes before the text unless the question places it "
        "with `<image>`):",
        "",
        "```jinja",
        prompt,
        "```",
        "",
        "## How to load",
        "",
    ]
    if adapter_only:
        lines += [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForImageTextToText",
            "",
            f'base = AutoModelForImageTextToText.from_pretrained("{_base_model_reference(cfg)}")',
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
            "model = model.merge_and_unload()  # optional: a plain transformers model",
            "```",
        ]
    else:
        lines += [
            "Plain transformers, no vispo needed (torchvision is not needed either):",
            "",
            "```python",
            "from PIL import Image",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            'folder = "PATH/TO/THIS/FOLDER"',
            "proc = AutoProcessor.from_pretrained(folder)",
            "model = AutoModelForImageTextToText.from_pretrained(folder)",
            'image = Image.open("image.png").convert("RGB")',
            'messages = [{"role": "user", "content": [',
            '    {"type": "image", "image": image},',
            '    {"type": "text", "text": "What shape is in the image?"},  # the rendered prompt',
            "]}]",
            "inputs = proc.apply_chat_template(messages, add_generation_prompt=True, "
            'tokenize=True, return_dict=True, return_tensors="pt")',
            "out = model.generate(**inputs)  # greedy, as in generation_config.json",
            'print(proc.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
            "```",
            "",
            "`generation_config.json` decodes greedily with the run's length cap and stop "
            "tokens, as vispo's own evaluation does. For Qwen-VL models the processor is saved "
            "as transformers' image-only `PaddleOCRVLProcessor` (same image-token expansion as "
            "the Qwen-VL processors, no video processor), so it loads without torchvision.",
        ]
    return "\n".join(lines) + "\n"


# --- the hub ----------------------------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}/[A-Za-z0-9][\w.\-]{0,95}$")


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    api=None,
    commit_message: str | None = None,
) -> str:
    """Upload an exported folder to the Hugging Face Hub; returns the repository URL.

    ``api`` defaults to ``huggingface_hub.HfApi(token=token)``: the repository is created if
    needed (``create_repo(exist_ok=True)``), then the folder is uploaded in one commit
    (``upload_folder``). Tests pass a stand-in ``api``; the upload itself is not exercised
    by vispo's tests (no network).
    """
    folder = Path(folder)
    if not _REPO_ID.match(repo_id or ""):
        raise ExportError(
            f"--push-to-hub: {repo_id!r} is not a repository id of the form owner/name"
        )
    if not (folder / "README.md").is_file():
        raise ExportError(f"{folder}: not an exported folder (no README.md)")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    try:
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=commit_message or f"vispo export of {folder.name}",
        )
    except OSError as e:  # huggingface_hub's HTTP and connection errors are OSErrors
        raise ExportError(f"upload to {repo_id} failed: {e}") from None
    return f"https://huggingface.co/{repo_id}"
