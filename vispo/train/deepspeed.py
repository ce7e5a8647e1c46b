"""DeepSpeed ZeRO-2 / ZeRO-3 (``train.strategy: zero2 | zero3``; optional: ``vispo[deepspeed]``).

ZeRO-2 partitions gradients and optimizer state across ranks, ZeRO-3 the parameters as well.
The trainer stays the same: the policy and vispo's AdamW go through ``deepspeed.initialize``
and the update calls four hooks instead of ``loss.backward()`` / ``optimizer.step()``:

- :func:`backward`: the engine's backward; only the last micro-batch of a mini-batch is a
  gradient-accumulation boundary, so the engine steps once per mini-batch. (ZeRO-2/3
  reduce-scatter gradients on every micro-batch by design: that is how they avoid holding
  full gradients. Only ZeRO-0/1 and DDP can defer the reduction to the boundary.)
- :func:`step`: the engine's step. DeepSpeed clips to ``optim.grad_clip`` with the global
  gradient norm, which it also returns, and skips the step on every rank when that norm is
  not finite. vispo's own checks (finite loss, finite log-probs) reach that skip by making
  this rank's last gradient NaN (see :func:`backward`).
- :func:`gathered`: ZeRO-3 gathers every parameter once for generation (HF ``generate``
  runs a different number of forwards on each rank, which per-layer gathers cannot).
- :func:`full_state` / :func:`load_full_state`: checkpoints in vispo's own format (full
  weights and full AdamW state keyed by parameter name, safetensors, no pickle), so a ZeRO
  checkpoint resumes under any strategy and number of ranks, and exports like any other.

Why ``deepspeed.initialize`` and not ``accelerate.Accelerator``: vispo runs DDP and FSDP2 on
torch directly, and its update decides per mini-batch whether to step (non-finite skip),
which learning rate to use, and where gradients are synchronised. Accelerate's DeepSpeed
wrapper steps the engine inside ``accelerator.backward`` and owns the process group, so it
would take those decisions away from the update and add a second launcher state. The
accelerate config files are still the way to start a run: ``accelerate launch`` turns them into
``ACCELERATE_*`` environment variables, which :func:`deepspeed_config` translates (the same
variables accelerate's own ``DeepSpeedPlugin`` reads).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from vispo.train.config import ConfigError

ZERO_STAGES = {"zero2": 2, "zero3": 3}


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed setting that vispo cannot honour; the message names the setting."""


# --- configuration -----------------------------------------------------------------------


def launched_stage(env: Mapping[str, str]) -> int | None:
    """The ZeRO stage of the accelerate config that launched this process (None: not DeepSpeed)."""
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true":
        return None
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage is None and env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        stage = (
            _read_json(env["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
            .get("zero_optimization", {})
            .get("stage")
        )
    if str(stage) not in ("2", "3"):
        raise DeepSpeedConfigError(
            f"accelerate config: zero_stage must be 2 or 3 for vispo (train.strategy zero2 or "
            f"zero3), got {stage!r}"
        )
    return int(stage)


def deepspeed_config(
    stage: int, *, micro_batch: int, grad_clip: float, env: Mapping[str, str] | None = None
) -> dict:
    """The DeepSpeed config for ZeRO ``stage``, from vispo's settings and the accelerate launch.

    vispo owns the optimizer, the learning-rate schedule, gradient accumulation (one engine
    step per mini-batch) and clipping (``optim.grad_clip``); accelerate or a DeepSpeed JSON
    file (``deepspeed_config_file``) may tune everything else (bucket sizes, overlap, ZeRO-3
    persistence thresholds). Settings that would change the maths or are untested here
    (fp16/bf16 weights, CPU/NVMe offload, zero.Init) raise :class:`DeepSpeedConfigError`.
    """
    env = os.environ if env is None else env
    base: dict = {}
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        base = _read_json(path)
        for key in ("optimizer", "scheduler"):
            if key in base:
                raise DeepSpeedConfigError(
                    f"{path}: remove {key!r}: vispo builds its own AdamW and learning-rate "
                    "schedule (optim.*)"
                )
        for key in ("fp16", "bf16"):
            if base.get(key, {}).get("enabled") not in (None, False, "auto"):
                raise DeepSpeedConfigError(
                    f"{path}: {key}.enabled: vispo keeps float32 master weights; use "
                    "train.autocast=bf16 for bfloat16 compute"
                )
        if base.get("gradient_accumulation_steps", "auto") not in ("auto", 1):
            raise DeepSpeedConfigError(
                f"{path}: gradient_accumulation_steps: vispo accumulates the micro-batches of a "
                "mini-batch itself (train.micro_batch); leave it out or set 1"
            )
        clip = base.get("gradient_clipping", "auto")
        if clip != "auto" and float(clip) != float(grad_clip):
            raise DeepSpeedConfigError(
                f"{path}: gradient_clipping={clip} differs from optim.grad_clip={grad_clip}; "
                "set optim.grad_clip"
            )
    zero = dict(base.get("zero_optimization", {}))
    if zero.get("stage", stage) != stage:
        raise DeepSpeedConfigError(
            f"zero_optimization.stage={zero['stage']} but train.strategy is zero{stage}"
        )
    zero["stage"] = stage

    offload = {
        "offload_optimizer": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"),
        "offload_param": env.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"),
    }
    for key, device in offload.items():
        device = zero.get(key, {}).get("device", device)
        if str(device).lower() not in ("none", "null"):
            raise DeepSpeedConfigError(
                f"{key}.device={device}: CPU/NVMe offload is not supported by vispo yet (it has "
                "not been tested); use zero3 across more GPUs, LoRA or train.gradient_checkpointing"
            )
    if env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        raise DeepSpeedConfigError(
            "zero3_init_flag: true is not supported: vispo loads the model itself and ZeRO-3 "
            "partitions it in deepspeed.initialize; set zero3_init_flag: false"
        )
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision not in ("no", "fp32"):
        raise DeepSpeedConfigError(
            f"mixed_precision={precision}: vispo keeps float32 master weights under DeepSpeed; set "
            "mixed_precision: 'no' and train.autocast=bf16 for bfloat16 compute"
        )
    accumulation = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1")
    if accumulation not in ("1", "auto"):
        raise DeepSpeedConfigError(
            f"gradient_accumulation_steps={accumulation}: vispo accumulates micro-batches itself "
            "(train.micro_batch); set 1"
        )
    clipping = env.get("ACCELERATE_GRADIENT_CLIPPING")
    if clipping not in (None, "none", "auto") and float(clipping) != float(grad_clip):
        raise DeepSpeedConfigError(
            f"gradient_clipping={clipping} differs from optim.grad_clip={grad_clip}; set "
            "optim.grad_clip (vispo's value is what DeepSpeed uses)"
        )
    leftover = [k for k, v in zero.items() if v == "auto"]
    if leftover:
        raise DeepSpeedConfigError(
            f"zero_optimization: vispo does not fill 'auto' values ({', '.join(leftover)}); set "
            "numbers or leave them out"
        )
    config = {k: v for k, v in base.items() if k not in ("train_batch_size", "fp16", "bf16")}
    config.update(
        {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": float(grad_clip) if grad_clip > 0 else 0.0,
            "zero_optimization": zero,
            # vispo's torch AdamW (per-group learning rates for the vision tower) is what
            # DeepSpeed partitions; it is not one of DeepSpeed's own optimizers.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": config.get("steps_per_print", 2**31 - 1),
        }
    )
    return config


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DeepSpeedConfigError(f"deepspeed_config_file {path}: {e}") from e


# --- the engine ----------------------------------------------------------------------------


def initialize(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: str,
    *,
    micro_batch: int,
    grad_clip: float,
    env: Mapping[str, str] | None = None,
):
    """``deepspeed.initialize`` on the policy and vispo's optimizer -> (engine, ZeRO optimizer).

    The process group must already exist (``setup_distributed``); DeepSpeed reuses it.
    """
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(
            f"train.strategy={strategy} needs DeepSpeed: pip install 'vispo[deepspeed]'"
        ) from e
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        _skip_shared_memory_op(deepspeed)
    names = {id(p): n for n, p in model.named_parameters()}
    param_names = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    config = deepspeed_config(
        ZERO_STAGES[strategy], micro_batch=micro_batch, grad_clip=grad_clip, env=env
    )
    engine, zero_optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=config
    )
    # The parameter names of each of vispo's optimizer groups (DeepSpeed replaces the groups'
    # parameters with flat partitions): checkpoints key the optimizer state by these names.
    zero_optimizer.vispo_param_names = param_names
    return engine, zero_optimizer


def _skip_shared_memory_op(deepspeed) -> None:
    """On the CPU accelerator DeepSpeed compiles a shared-memory all-reduce kernel (minutes, and
    a C++ compiler) when its communication backend starts; only its inference all-reduce uses
    it. Marking the op unavailable makes the backend use gloo for everything."""
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def is_engine(model) -> bool:
    """True iff ``model`` is a DeepSpeed engine (without importing DeepSpeed)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def uses_zero(optimizer) -> bool:
    """True iff ``optimizer`` is the ZeRO optimizer of an engine made by :func:`initialize`."""
    return hasattr(optimizer, "vispo_param_names")


def backward(engine, loss: torch.Tensor, *, last: bool, ok: torch.Tensor) -> None:
    """Backward through the engine; ``last``: the mini-batch's last micro-batch (its boundary).

    ``ok`` (a 0-dim bool tensor): this rank's loss and inputs were finite over the whole
    mini-batch. If not, the last backward is multiplied by NaN: the global gradient norm is
    then NaN on every rank and DeepSpeed skips the step and clears the gradients everywhere,
    the same decision DDP/FSDP2 reach with an all-reduce.
    """
    if last:
        loss = loss * torch.where(ok, 1.0, math.nan).to(loss.device)
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss, scale_wrt_gas=False)


def step(engine) -> tuple[bool, torch.Tensor]:
    """Clip (``optim.grad_clip``), step, zero the gradients -> (applied, global grad norm)."""
    engine.step()
    norm = engine.get_global_grad_norm()
    norm = torch.as_tensor(math.nan if norm is None else norm, dtype=torch.float32).cpu()
    return bool(engine.was_step_applied()), norm


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """ZeRO-3: every rank holds the full parameters inside (other strategies: nothing to do).

    Generation runs a different number of forwards on each rank (responses end at different
    lengths, dynamic sampling may take more rounds on one rank), so it must not run ZeRO-3's
    module hooks, which gather each layer's parameters and check the module order with
    collectives. The parameters are gathered once; the hooks are lifted for the duration and
    put back on exit (DeepSpeed then re-records its prefetch trace), and the parameters are
    partitioned again. Needs memory for the full model on every rank meanwhile.
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    offload = params[0]._z3_optimizer.parameter_offload  # owns the module hooks
    root = offload.module
    start_hook = offload.fwd_pre_hook.hooks_dict_ref()[offload.fwd_pre_hook.id]
    with deepspeed.zero.GatheredParameters(params):
        offload.fwd_pre_hook.remove()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for p in params:
            p.ds_active_sub_modules.clear()
        try:
            yield
        finally:  # the same hooks, in the order DeepSpeed registered them
            offload.fwd_pre_hook = root.register_forward_pre_hook(start_hook)
            offload._register_deepspeed_module(root)


# --- checkpoints ---------------------------------------------------------------------------


def _zero3(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


def full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """The full weights and AdamW state, in the format of torch's ``get_model_state_dict`` /
    ``get_optimizer_state_dict(full_state_dict=True)`` (state keyed by parameter name).

    Collective: every rank calls it; each parameter is gathered in turn (one at a time, so the
    peak is one full parameter per rank), copied to CPU.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_optimizer_state

    weights = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if isinstance(tensor, torch.nn.Parameter) and _zero3(tensor):
            with deepspeed.zero.GatheredParameters([tensor]):
                weights[name] = tensor.detach().cpu().clone()
        else:
            weights[name] = tensor.detach().cpu().clone()
    params = dict(model.named_parameters())
    keys, step = _state_keys(optimizer)
    if keys:
        _link_fragments(optimizer)
    state = {}
    for names in optimizer.vispo_param_names:
        for name in names:
            p = params[name]
            entry = {} if step is None else {"step": step.clone()}
            for key in keys:
                full = safe_get_full_optimizer_state(p, key)
                entry[key] = full.detach().reshape(weights[name].shape).cpu().clone()
            if entry:
                state[name] = entry
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": list(names)}
        for g, names in zip(optimizer.param_groups, optimizer.vispo_param_names)
    ]
    return weights, {"state": state, "param_groups": groups}


def _flat_partitions(optimizer) -> list[torch.Tensor]:
    """The flat float32 partitions this rank's inner optimizer updates (one per group or
    ZeRO-3 sub-group)."""
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
        return list(optimizer.fp32_partitioned_groups_flat)
    return list(optimizer.single_partition_of_fp32_groups)  # ZeRO-1/2


def _state_keys(optimizer) -> tuple[list[str], torch.Tensor | None]:
    """The per-element AdamW state keys (``exp_avg``, ...) and the step count; ([], None)
    before the first step."""
    flats = _flat_partitions(optimizer)
    inner = optimizer.optimizer.state
    if not flats or flats[0] not in inner:
        return [], None
    first = inner[flats[0]]
    keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == flats[0].shape)
    return keys, first.get("step")


def set_full_weights(model: torch.nn.Module, optimizer, weights: dict) -> None:
    """Load full weights (from any strategy's checkpoint) into the partitions, on every rank.

    Raises RuntimeError naming missing/unexpected weights, like ``load_state_dict(strict=True)``.
    """
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    current = model.state_dict(keep_vars=True)
    missing, unexpected = sorted(set(current) - set(weights)), sorted(set(weights) - set(current))
    if missing or unexpected:
        raise RuntimeError(f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    rank = torch.distributed.get_rank()
    for name, tensor in current.items():
        value = weights[name]
        if isinstance(tensor, torch.nn.Parameter) and _zero3(tensor):
            # Rank 0's copy is broadcast and re-partitioned on exit.
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                if rank == 0:
                    tensor.data.copy_(value.reshape(tensor.shape))
        else:
            tensor.data.copy_(value)
    params = dict(model.named_parameters())
    trainable = [n for names in optimizer.vispo_param_names for n in names]
    for name in trainable:  # the float32 master copies the optimizer updates
        safe_set_full_fp32_param(params[name], weights[name].float())


def set_full_optimizer_state(model: torch.nn.Module, optimizer, osd: dict) -> None:
    """Load a full AdamW state (keyed by parameter name, any strategy's checkpoint) into this
    rank's partitions, and the groups' hyperparameters."""
    from deepspeed.utils import safe_set_full_optimizer_state

    params = dict(model.named_parameters())
    trainable = [n for names in optimizer.vispo_param_names for n in names]
    saved = osd.get("state", {})
    if not saved:
        return
    some = saved[trainable[0]]
    keys = sorted(k for k, v in some.items() if torch.is_tensor(v) and v.dim() > 0)
    _materialize_state(optimizer, keys, some.get("step"))
    for name in trainable:
        for key in keys:
            safe_set_full_optimizer_state(params[name], saved[name][key].float(), key)
    saved_groups = {tuple(g["params"]): g for g in osd.get("param_groups", [])}
    for group, names in zip(optimizer.param_groups, optimizer.vispo_param_names):
        saved_group = saved_groups[tuple(names)]  # KeyError: another model or optimizer
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def _materialize_state(optimizer, keys: list[str], step) -> None:
    """Create the inner AdamW's per-partition state (zeros, the saved step) that a fresh engine
    does not have before its first step, and link ZeRO-1/2's per-parameter views of it."""
    inner = optimizer.optimizer.state
    step = torch.as_tensor(0.0 if step is None else float(step), dtype=torch.float32)
    for flat in _flat_partitions(optimizer):
        entry = inner.setdefault(flat, {})
        for key in keys:
            entry.setdefault(key, torch.zeros_like(flat))
        entry["step"] = step.clone()
    _link_fragments(optimizer)


def _link_fragments(optimizer) -> None:
    """ZeRO-1/2: point each parameter's view of the optimizer state at the current state.

    DeepSpeed 0.19.8 links these views once, inside the first step of the first parameter
    group, when the other groups have no state yet: with several groups (vispo has up to
    four) the later groups' views stay empty and ``safe_get_full_optimizer_state`` fails.
    Linking again once every group has state fixes that. (ZeRO-3 reads the state directly.)
    """
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    if hasattr(optimizer, "bit16_groups"):
        inner = optimizer.optimizer.state
        for params, flat in zip(optimizer.bit16_groups, optimizer.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(params, flat, inner)
