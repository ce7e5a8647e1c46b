"""Typed run configuration: YAML file + ``section.field=value`` overrides, validated up front.

Every field has a default and help text (``vispo train --help`` prints them). Unknown keys are
rejected with the closest valid name; inconsistent values fail here, before any model is
loaded, with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from vispo.algos import PRESETS, ObjectiveConfig, objective_preset


class ConfigError(ValueError):
    """An invalid configuration; the message names the offending field."""


def _f(default, help: str, *, factory=None):
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = _f(
        "builtin:vispo-tiny",
        "Policy to train: a local Hugging Face model folder, a hub id (downloaded only when you "
        "name one), or 'builtin:vispo-tiny' (the small VLM shipped with vispo) / "
        "'tiny:<arch>' (a random tiny model: qwen2_vl, qwen2_5_vl, qwen3_vl, idefics3).",
    )
    dtype: str = _f("float32", "Parameter dtype: float32, bfloat16 or float16.")
    trust_remote_code: bool = _f(False, "Allow the model folder's own Python code to run.")
    freeze_vision: bool = _f(False, "Freeze the vision tower (train language model + connector).")
    lora: bool = _f(False, "Train LoRA adapters (peft) instead of all weights.")
    lora_r: int = _f(16, "LoRA rank.")
    lora_alpha: int = _f(32, "LoRA alpha.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    seed: int = _f(0, "Seed for 'tiny:<arch>' random models.")


@dataclass
class DataConfig:
    name: str = _f(
        "easy-vqa",
        "Training data: a built-in name (easy-vqa, synthetic) or a path (HF dataset folder, "
        ".parquet, .json/.jsonl).",
    )
    split: str = _f("train", "Split to train on.")
    eval_split: str = _f(
        "test",
        "Split of the held-out set (of data.eval_name, else of data.name); easy-vqa has "
        "validation (1,005 q. of train images never trained on: tune there) and test.",
    )
    eval_name: str | None = _f(
        None,
        "Held-out set: a built-in name or a path (any layout data.name accepts). Default: "
        "data.name's eval_split; a local data set without one holds out a fixed-seed slice "
        "of its training rows (at most 20%, never trained on). See docs/data.md.",
    )
    eval_size: int = _f(300, "Held-out questions scored at the start/end (0: none).")
    template: str = _f(
        "short",
        "Prompt template: reasoning (think, then \\boxed{}), short (one word), plain, or a "
        "Jinja string / .jinja path.",
    )
    image_root: str | None = _f(None, "Folder that relative image paths are resolved against.")
    columns: dict[str, str] = _f(None, "Column mapping, e.g. {question: query}.", factory=dict)
    max_prompt_length: int = _f(
        1024, "Prompts longer than this (image tokens included) are dropped up front."
    )
    limit: int | None = _f(None, "Use at most this many training samples.")
    on_error: str = _f("skip", "Bad samples: 'skip' (counted) or 'raise'.")
    synthetic_size: int = _f(2000, "Items generated when name is 'synthetic'.")


@dataclass
class RolloutConfig:
    n: int = _f(5, "Responses sampled per prompt (the group size).")
    temperature: float = _f(1.0, "Sampling temperature (also divides logits when scoring).")
    top_p: float = _f(1.0, "Nucleus sampling; PAPO uses 0.99, CPPO 1.0.")
    max_new_tokens: int = _f(256, "Maximum response length in tokens.")
    min_new_tokens: int = _f(0, "Minimum response length (forces longer outputs).")
    batch_invariant: bool = _f(
        False,
        "Generate each prompt separately with its own seed (from the run seed, step and its "
        "place in the global batch), so the samples do not depend on batching or the number of "
        "ranks. Slower: prompts are not batched together.",
    )
    backend: str = _f(
        "hf",
        "Generation engine: 'hf' (Hugging Face generate on the policy itself) or "
        "'module.path:Factory' returning a vispo.rollout.RolloutBackend (weights synced after "
        "every update; see docs/rollout_backends.md).",
    )


@dataclass
class RewardConfig:
    name: str = _f(
        "reference",
        "Reward: reference (0.9 accuracy + 0.1 format), math, format, choice, yesno, exact, "
        "or 'path/to/file.py:function'.",
    )
    funcs: list[str] = _f(
        None,
        "Several reward functions (names or 'file.py:function', vispo or TRL signature), "
        "summed with reward.weights and each logged as reward/{name}/mean; replaces name.",
        factory=list,
    )
    weights: list[float] = _f(
        None, "Weights of reward.funcs, one per function (default: 1 each).", factory=list
    )
    num_workers: int | None = _f(
        None,
        "Worker processes for the reward. Default: 1 for a reward file (sandboxed: a call that "
        "hangs is timed out, a crash is isolated), in-process for the built-in rewards. "
        "0 runs any reward in this process: trusted code only, no timeout.",
    )
    timeout_s: float = _f(10.0, "Per-call timeout of a reward function, seconds.")
    overlong_buffer: int = _f(0, "DAPO overlong shaping: penalty buffer in tokens (0: off).")
    overlong_penalty: float = _f(1.0, "DAPO overlong shaping: penalty at the maximum length.")
    # Sandbox of reward workers (docs/reliability.md lists what is isolated and what is not).
    env: list[str] = _f(
        None,
        "Environment variables passed to reward workers, e.g. [OPENAI_API_KEY]; every other "
        "variable of the trainer (credentials included) is withheld.",
        factory=list,
    )
    max_consecutive_failures: int = _f(
        5,
        "Stop the run once the reward failed on every sample of this many calls in a row (0: never).",
    )
    memory_mb: int = _f(4096, "Address-space limit of a reward worker, MiB (0: none).")
    cpu_s: int = _f(
        3600, "CPU-seconds limit of a reward worker (it is replaced after half; 0: none)."
    )
    file_size_mb: int = _f(64, "Largest file a reward worker may write, MiB (0: none).")
    max_processes: int = _f(
        16, "Processes/threads a reward worker's user may start (applies to non-root users)."
    )
    user: str = _f(
        "nobody",
        "Unprivileged user reward workers switch to when vispo runs as root ('' : stay).",
    )
    network: bool = _f(False, "Let reward workers use the network (default: a netns with none).")


@dataclass
class OptimConfig:
    lr: float = _f(1e-6, "AdamW learning rate (PAPO/CPPO recipes: 1e-6).")
    vision_lr_scale: float = _f(1.0, "Learning-rate multiplier for the vision tower.")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    beta1: float = _f(0.9, "AdamW beta1.")
    beta2: float = _f(0.999, "AdamW beta2.")
    warmup_steps: int = _f(0, "Linear warm-up, in optimizer steps.")
    schedule: str = _f("constant", "After warm-up: constant, linear (to 0) or cosine (to 0).")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: off).")


@dataclass
class TrainConfig:
    steps: int = _f(100, "RL steps (each: rollout, reward, update).")
    prompts_per_step: int = _f(16, "Prompts per step; each gets rollout.n responses.")
    ppo_epochs: int = _f(1, "Passes over each step's rollouts.")
    mini_batch_size: int | None = _f(
        None,
        "Sequences per optimizer step (default: all of the step's sequences). Each PPO epoch "
        "shuffles whole groups, so with a multiple of rollout.n (and such micro-batches) every "
        "group stays in one micro-batch with its prompt.",
    )
    micro_batch_size: int | None = _f(
        None, "Sequences per forward/backward (gradient accumulation; default: mini-batch)."
    )
    micro_batch_norm: str = _f(
        "global",
        "Loss normalisation across micro-batches: 'global' (exact mini-batch token-mean) or "
        "'per-micro' (reference code: mean per micro-batch, divided by their number).",
    )
    stack_variants: bool = _f(True, "Stack image variants into one forward call.")
    seed: int = _f(0, "One seed for data order, perturbations, sampling and initialisation.")
    out_dir: str = _f("runs/default", "Run folder: metrics, samples, checkpoints.")
    save_every: int = _f(50, "Checkpoint every N steps (and at the end; 0: only at the end).")
    keep_last: int = _f(2, "Checkpoints kept (older ones are deleted).")
    eval_every: int = _f(0, "Evaluate on the held-out subset every N steps (0: start/end only).")
    samples_every: int = _f(25, "Write an HTML page of sample completions every N steps (0: off).")
    max_skipped_in_row: int = _f(
        5, "Stop (with a checkpoint) after this many consecutive non-finite steps."
    )
    threads: int | None = _f(None, "torch CPU threads (default: torch's choice).")
    device: str = _f("auto", "auto (CUDA when available), cuda or cpu.")
    autocast: str = _f(
        "none",
        "Mixed precision of every forward (generation, scoring, update): 'none' (the "
        "parameters' dtype) or 'bf16' (torch.autocast to bfloat16 over float32 weights; the "
        "usual choice on GPUs). Log-probs and entropies are reduced in float32 either way.",
    )
    shared_prefix: str = _f(
        "auto",
        "Compute each prompt, image included, once per group instead of once per response: "
        "generation prefills it once and repeats its KV cache for the group's rollouts; every "
        "scoring and update forward runs the distinct prompts once and the responses against "
        "their keys and values (gradients of all of a prompt's responses flow back into it "
        "once). Same samples, log-probs and gradients as 'off' up to float rounding (tested). "
        "Works with (non-reentrant) activation checkpointing and every strategy (ddp, fsdp2, "
        "zero2, zero3). 'auto': on, except with reentrant checkpointing, which falls back to "
        "'off' with a logged reason; 'on': that is an error.",
    )
    strategy: str = _f(
        "auto",
        "Data parallelism under torchrun / accelerate launch: 'ddp' (replicated weights), "
        "'fsdp2' (sharded parameters, gradients and optimizer state), 'zero2' (DeepSpeed "
        "ZeRO-2: sharded gradients and optimizer state), 'zero3' (DeepSpeed ZeRO-3: also the "
        "parameters); DeepSpeed needs `pip install vispo[deepspeed]`. 'auto': the strategy of "
        "the accelerate config file that launched the run (configs/accelerate/), else 'ddp'.",
    )


@dataclass
class GuardConfig:
    enabled: bool = _f(True, "Watch for KL_prcp hacking (PAPO paper, section 6.4).")
    window: int = _f(20, "Steps of history the guard compares against.")
    min_history: int = _f(10, "Steps before the guard starts judging.")
    z_threshold: float = _f(4.0, "A metric this many robust std above its history is a surge.")
    min_signals: int = _f(2, "Surging signals needed (of perception KL, clip high, 2 entropies).")
    action: str = _f("warn", "On collapse: warn, halve_gamma, or stop (with a checkpoint).")


@dataclass
class LoggingConfig:
    progress: bool = _f(True, "Show a progress bar with ETA and key metrics.")
    tensorboard: bool = _f(False, "Also log to TensorBoard (needs the tensorboard package).")
    wandb: bool = _f(False, "Also log to Weights & Biases (needs wandb).")
    wandb_project: str = _f("vispo", "W&B project name.")
    samples_per_page: int = _f(8, "Completions on each HTML samples page.")


@dataclass
class Config:
    objective: ObjectiveConfig = _f(
        None, "The objective (see vispo.algos).", factory=ObjectiveConfig
    )
    model: ModelConfig = _f(None, "The policy model.", factory=ModelConfig)
    data: DataConfig = _f(None, "Training and held-out data.", factory=DataConfig)
    rollout: RolloutConfig = _f(None, "Response sampling.", factory=RolloutConfig)
    reward: RewardConfig = _f(None, "Reward function.", factory=RewardConfig)
    optim: OptimConfig = _f(None, "Optimizer and schedule.", factory=OptimConfig)
    train: TrainConfig = _f(None, "The loop.", factory=TrainConfig)
    guard: GuardConfig = _f(None, "Collapse guard.", factory=GuardConfig)
    logging: LoggingConfig = _f(None, "Logging sinks.", factory=LoggingConfig)

    @property
    def sequences_per_step(self) -> int:
        return self.train.prompts_per_step * self.rollout.n

    @property
    def mini_batch(self) -> int:
        return self.train.mini_batch_size or self.sequences_per_step

    @property
    def micro_batch(self) -> int:
        return self.train.micro_batch_size or self.mini_batch

    def validate(self) -> Config:
        """Cross-field checks; raises ConfigError naming the field."""
        t, r, o = self.train, self.rollout, self.optim

        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{name}: {msg}")

        # Every number finite: an infinite learning rate, timeout or weight passes every `>`
        # check below and then NaNs the weights or hangs the run.
        for name, value in _numbers(self):
            need(math.isfinite(value), name, f"must be a finite number, got {value}")

        need(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
        need(t.prompts_per_step >= 1, "train.prompts_per_step", "must be >= 1")
        need(r.n >= 2, "rollout.n", f"group-relative advantages need n >= 2, got {r.n}")
        need(t.ppo_epochs >= 1, "train.ppo_epochs", "must be >= 1")
        need(self.mini_batch >= 1, "train.mini_batch_size", "must be >= 1")
        need(
            self.sequences_per_step % self.mini_batch == 0,
            "train.mini_batch_size",
            f"{self.mini_batch} must divide prompts_per_step x rollout.n = {self.sequences_per_step}",
        )
        need(self.micro_batch >= 1, "train.micro_batch_size", "must be >= 1")
        need(
            self.mini_batch % self.micro_batch == 0,
            "train.micro_batch_size",
            f"{self.micro_batch} must divide the mini-batch size {self.mini_batch}",
        )
        need(
            t.micro_batch_norm in ("global", "per-micro"),
            "train.micro_batch_norm",
            "must be 'global' or 'per-micro'",
        )
        need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
        need(t.device in ("auto", "cuda", "cpu"), "train.device", "must be auto, cuda or cpu")
        need(t.autocast in ("none", "bf16"), "train.autocast", "must be none or bf16")
        # YAML reads a bare on/off as a boolean.
        t.shared_prefix = {"true": "on", "false": "off"}.get(
            t.shared_prefix.lower(), t.shared_prefix
        )
        need(
            t.shared_prefix in ("auto", "on", "off"),
            "train.shared_prefix",
            f"must be auto, on or off, got {t.shared_prefix!r}",
        )
        need(
            t.strategy in ("auto", "ddp", "fsdp2", "zero2", "zero3"),
            "train.strategy",
            f"must be auto, ddp, fsdp2, zero2 or zero3, got {t.strategy!r}",
        )
        for name in ("save_every", "eval_every", "samples_every"):
            need(getattr(t, name) >= 0, f"train.{name}", "must be >= 0")
        need(t.max_skipped_in_row >= 1, "train.max_skipped_in_row", "must be >= 1")
        need(r.temperature > 0, "rollout.temperature", f"must be > 0, got {r.temperature}")
        need(r.temperature <= 100, "rollout.temperature", f"must be <= 100, got {r.temperature}")
        need(0 < r.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {r.top_p}")
        need(r.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
        need(
            r.backend == "hf" or r.backend.count(":") == 1,
            "rollout.backend",
            f"must be 'hf' or 'module.path:Factory', got {r.backend!r}",
        )
        need(
            0 <= r.min_new_tokens <= r.max_new_tokens,
            "rollout.min_new_tokens",
            "must be in [0, max_new_tokens]",
        )
        need(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
        need(o.lr <= 1, "optim.lr", f"must be <= 1 (AdamW), got {o.lr}")
        need(
            0 <= o.weight_decay <= 1,
            "optim.weight_decay",
            f"must be in [0, 1], got {o.weight_decay}",
        )
        need(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
        need(0 <= o.beta1 < 1, "optim.beta1", f"must be in [0, 1), got {o.beta1}")
        need(0 <= o.beta2 < 1, "optim.beta2", f"must be in [0, 1), got {o.beta2}")
        need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        need(
            0 <= o.vision_lr_scale <= 1000,
            "optim.vision_lr_scale",
            f"must be in [0, 1000], got {o.vision_lr_scale}",
        )
        need(
            o.schedule in ("constant", "linear", "cosine"),
            "optim.schedule",
            f"must be constant, linear or cosine, got {o.schedule!r}",
        )
        need(
            self.model.dtype in ("float32", "bfloat16", "float16"),
            "model.dtype",
            f"must be float32, bfloat16 or float16, got {self.model.dtype!r}",
        )
        need(self.data.on_error in ("skip", "raise"), "data.on_error", "must be skip or raise")
        need(self.data.max_prompt_length >= 1, "data.max_prompt_length", "must be >= 1")
        need(self.data.eval_size >= 0, "data.eval_size", "must be >= 0")
        need(
            self.data.limit is None or self.data.limit >= 1,
            "data.limit",
            f"must be >= 1 (or null: no limit), got {self.data.limit}",
        )
        need(bool(self.data.name.strip()), "data.name", "must not be empty")
        need(bool(self.model.name_or_path.strip()), "model.name_or_path", "must not be empty")
        need(t.threads is None or t.threads >= 0, "train.threads", "must be >= 0")
        rt = self.reward.timeout_s
        need(rt > 0, "reward.timeout_s", "must be > 0")
        need(rt <= 86400, "reward.timeout_s", f"must be <= 86400 (one day), got {rt}")
        need(
            self.reward.overlong_penalty >= 0,
            "reward.overlong_penalty",
            f"must be >= 0, got {self.reward.overlong_penalty}",
        )
        need(
            not self.reward.weights or len(self.reward.weights) == len(self.reward.funcs),
            "reward.weights",
            f"has {len(self.reward.weights)} values for {len(self.reward.funcs)} reward.funcs",
        )
        need(
            self.reward.num_workers is None or self.reward.num_workers >= 0,
            "reward.num_workers",
            "must be >= 0",
        )
        need(self.reward.overlong_buffer >= 0, "reward.overlong_buffer", "must be >= 0")
        env = self.reward.env
        need(
            isinstance(env, list)
            and all(isinstance(n, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n) for n in env),
            "reward.env",
            "must be a list of environment variable names",
        )
        for name in ("max_consecutive_failures", "memory_mb", "cpu_s", "file_size_mb"):
            need(getattr(self.reward, name) >= 0, f"reward.{name}", "must be >= 0")
        need(self.reward.max_processes >= 0, "reward.max_processes", "must be >= 0")
        need(
            self.reward.overlong_buffer <= r.max_new_tokens,
            "reward.overlong_buffer",
            "must be <= rollout.max_new_tokens",
        )
        need(
            self.guard.action in ("warn", "halve_gamma", "stop"),
            "guard.action",
            f"must be warn, halve_gamma or stop, got {self.guard.action!r}",
        )
        need(self.guard.window >= 2, "guard.window", "must be >= 2")
        need(self.guard.z_threshold > 0, "guard.z_threshold", "must be > 0")
        need(1 <= self.guard.min_signals <= 4, "guard.min_signals", "must be in 1..4")
        if self.objective.agg == "seq-mean-token-sum-norm" and self.objective.horizon is None:
            # Dr. GRPO's normaliser is a constant (verl: the configured max response length),
            # not the longest response of the step.
            self.objective.horizon = r.max_new_tokens
        return self


def _numbers(cfg: Config):
    """``(dotted name, value)`` of every float in the config, nested mappings included
    (``objective.extra_terms``)."""

    def walk(value, name):
        if isinstance(value, float):
            yield name, value
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{name}.{k}")

    for section in fields(cfg):
        obj = getattr(cfg, section.name)
        for f in fields(obj):
            yield from walk(getattr(obj, f.name), f"{section.name}.{f.name}")


# --- loading -------------------------------------------------------------------------------


#: A config of more values than this, counted with YAML aliases expanded, is refused: a real
#: config has a few hundred, while an "alias bomb" (a few lines, billions of values once
#: expanded) would exhaust memory in anything that walks or prints it.
MAX_CONFIG_VALUES = 100_000

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother = 3, 80, 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8


def _show(value: Any) -> str:
    """A value as an error message shows it: repr, bounded in depth, width and length."""
    text = _REPR.repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _check_size(tree: Any, where: str) -> None:
    """Refuse a tree of more than MAX_CONFIG_VALUES values (aliases expanded, cycles included);
    visits at most that many nodes."""
    stack, seen = [tree], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(
                f"{where}: more than {MAX_CONFIG_VALUES} values once YAML aliases are expanded "
                "(an alias bomb?); refused"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple, set)):
            stack.extend(node)


def _type_of(cls, name: str):
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, bool) or not isinstance(value, (float, str)):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        try:
            number = float(value)
        except (ValueError, OverflowError):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}") from None
        if math.isnan(number):  # NaN never means anything in a config and passes every `<`
            raise ConfigError(f"{where}: expected a number, got NaN")
        return number
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return str(value)
    if origin is list:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{where}: expected a list, got {value!r}") from None
            if isinstance(value, (str, int, float)):  # a single item given without brackets
                value = [value]
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        if inner is Any:
            return list(value)
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise ConfigError(f"{where}: expected a mapping, got {_show(value)}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_show(value)}")
        key_type, value_type = (args + (Any, Any))[:2]
        for k, v in value.items():
            if key_type is str and not isinstance(k, str):
                raise ConfigError(f"{where}: keys must be strings, got {_show(k)}")
            if value_type in (str, dict) and not isinstance(v, value_type):
                kind = "a string" if value_type is str else "a mapping"
                raise ConfigError(f"{where}[{_show(k)}]: expected {kind}, got {_show(v)}")
        return dict(value)
    return value


def _suggest(name, options) -> str:
    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _section(cls, values: dict, prefix: str):
    names = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown config key {prefix}{key}{_suggest(key, names)}")
        kwargs[key] = _coerce(value, _type_of(cls, key), prefix + key)
    return kwargs


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
    node[parts[-1]] = value


SECTIONS = {f.name: f for f in fields(Config)}


def build_config(tree: dict | None = None) -> Config:
    """A validated Config from a nested dict (YAML layout)."""
    _check_size(tree, "config")
    tree = dict(tree or {})
    sections = {}
    for name, values in tree.items():
        if name not in SECTIONS:
            raise ConfigError(f"unknown config section {_show(name)}{_suggest(name, SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {_show(values)}")
        sections[name] = values
    try:
        objective_values = dict(sections.pop("objective", {}))
        _load_plugins(objective_values)
        preset = objective_values.pop("name", "grpo")
        if not isinstance(preset, str) or preset not in PRESETS:
            raise ConfigError(
                f"objective.name: unknown preset {_show(preset)}{_suggest(preset, PRESETS)}"
            )
        objective = objective_preset(
            preset, **_section(ObjectiveConfig, objective_values, "objective.")
        )
        built = {
            name: typing.get_type_hints(Config)[name](
                **_section(typing.get_type_hints(Config)[name], values, name + ".")
            )
            for name, values in sections.items()
        }
    except ConfigError:
        raise
    except ValueError as e:  # field validation inside ObjectiveConfig
        raise ConfigError(str(e)) from None
    return Config(objective=objective, **built).validate()


def _load_plugins(objective_values: dict) -> None:
    """Import ``objective.plugins`` and the entry points of unknown ``extra_terms`` first, so
    that the terms they register pass validation (vispo.train.plugins)."""
    from vispo.train.plugins import load_terms

    plugins = _coerce(objective_values.get("plugins", []), list[str], "objective.plugins")
    # A plugin file is kept as an absolute path, so the saved config finds it from anywhere.
    plugins = [str(Path(p).expanduser().resolve()) if p.endswith(".py") else p for p in plugins]
    if plugins:
        objective_values["plugins"] = plugins
    terms = objective_values.get("extra_terms") or {}
    if isinstance(terms, str):
        terms = _coerce(terms, dict[str, dict], "objective.extra_terms")
    load_terms(plugins, list(terms) if isinstance(terms, dict) else [])


def parse_overrides(overrides: list[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {_show(item)} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) < 2 or not all(p.strip() for p in parts):
            raise ConfigError(f"override {_show(item)} must name section.field")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:  # e.g. a Jinja template: the text itself is the value
            value = raw
        _check_size(value, key.strip())
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (optional) and apply ``section.field=value`` overrides."""
    tree: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())  # safe_load: a config never runs code
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({e})") from None
        except RecursionError:
            raise ConfigError(f"{p}: nested too deeply to be a config") from None
        _check_size(loaded, str(p))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded or {}
    return build_config(_merge(tree, parse_overrides(overrides or [])))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def help_text() -> str:
    """Every field, its built-in default and its help, grouped by section, each field once
    (``vispo train --help`` shows the values a run uses instead:
    :func:`vispo.train.presets.effective_help`)."""
    lines = []
    for name, sec in SECTIONS.items():
        cls = typing.get_type_hints(Config)[name]
        lines.append(f"{name}: {sec.metadata['help']}")
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_ = f.metadata.get("help", "")
            if name == "objective" and f.name == "name":  # listed once, with the choices
                help_ = f"Preset the objective starts from: {', '.join(PRESETS)}."
            lines.append(f"  {name}.{f.name} = {default!r}")
            lines.append(f"      {help_}")
    return "\n".join(lines)
