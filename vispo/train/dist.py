"""Distributed training on torch.distributed: DDP or FSDP2, on CPU (gloo) or GPU (nccl).

vispo does not implement its own data parallelism: it wraps the policy in PyTorch's
``DistributedDataParallel`` or shards it with FSDP2's ``fully_shard``, and uses collectives
only for what the objective needs to be independent of the number of ranks:

- each rank rolls out its own slice of the step's prompts, so a prompt's group stays on one
  rank and the group advantages need no communication;
- the aggregation denominator (tokens of the whole mini-batch) is all-reduced, and every
  rank's loss is scaled by the world size because DDP / FSDP2 average gradients: the update is
  then exactly the one-process update on the global batch;
- metrics are all-reduced (``loss/*`` parts summed, maxima maxed, the rest averaged).

DeepSpeed ZeRO-2/3 (``zero2`` / ``zero3``) wrap the policy together with its optimizer, so
they happen in :func:`wrap_optimizer` (details in :mod:`vispo.train.deepspeed`).

Launch with ``torchrun --nproc_per_node N -m vispo.cli train ...`` or ``accelerate launch
--config_file configs/accelerate/<strategy>.yaml -m vispo.cli train ...``; with
``train.strategy: auto`` the accelerate config picks the strategy (see docs/distributed.md).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from vispo.train import deepspeed as ds
from vispo.train.config import ConfigError

STRATEGIES = ("ddp", "fsdp2", *ds.ZERO_STAGES)


def resolve_strategy(requested: str, env: dict[str, str] | None = None) -> str:
    """The strategy to run: ``requested``, or for ``auto`` the one of the accelerate config
    that launched this process (``accelerate launch --config_file``), else ``ddp``.

    An explicit strategy that contradicts the accelerate launch is an error (the run would
    silently ignore the config file otherwise).
    """
    env = os.environ if env is None else env
    stage = ds.launched_stage(env)
    if stage is not None:
        launched = f"zero{stage}"
    elif env.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        if env.get("FSDP_VERSION", "1") != "2":
            raise ConfigError(
                "accelerate config: vispo shards with FSDP2 only; set fsdp_version: 2 "
                "(configs/accelerate/fsdp2.yaml)"
            )
        launched = "fsdp2"
    else:
        launched = None
    if requested == "auto":
        return launched or "ddp"
    if requested not in STRATEGIES:
        raise ConfigError(f"train.strategy must be auto or one of {STRATEGIES}, got {requested!r}")
    if launched is not None and launched != requested:
        raise ConfigError(
            f"train.strategy={requested} but accelerate launched this run with {launched}; set "
            f"train.strategy={launched} or auto"
        )
    return requested


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_reduce(self, tensor: torch.Tensor, op=None) -> torch.Tensor:
        """A reduced copy of ``tensor`` (sum by default); the input itself when single-process."""
        if not self.active:
            return tensor
        out = tensor.detach().clone().to(self._comm_device)
        dist.all_reduce(out, op=op or dist.ReduceOp.SUM)
        return out.to(tensor.device)

    def gather_rows(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Every rank's ``[b_r, k]`` rows in rank order (``b_r`` may differ), each row's rank,
        and where this rank's rows start. Collective: every rank calls it."""
        if not self.active:
            return local, torch.zeros(local.shape[0], dtype=torch.long), 0
        sizes = torch.zeros(self.world, dtype=torch.long)
        sizes[self.rank] = local.shape[0]
        sizes = self.all_reduce(sizes).tolist()
        buf = torch.zeros(self.world, max(sizes), *local.shape[1:], dtype=local.dtype)
        buf[self.rank, : local.shape[0]] = local.detach().cpu()
        buf = self.all_reduce(buf)
        rows = torch.cat([buf[r, :n] for r, n in enumerate(sizes)]).to(local.device)
        owner = torch.repeat_interleave(torch.arange(self.world), torch.tensor(sizes))
        return rows, owner.to(local.device), sum(sizes[: self.rank])

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def synchronize(self) -> None:
        """Wait for this rank's queued GPU work (phase timings; a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Sum ``loss/*`` parts, max ``*/max`` and ``time/*``, average everything else."""
        if not self.active:
            return metrics
        keys = sorted(metrics)
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
        summed = self.all_reduce(values)
        maxed = self.all_reduce(values, op=dist.ReduceOp.MAX)
        out = {}
        for i, k in enumerate(keys):
            if k.startswith("loss/"):
                out[k] = float(summed[i])
            elif k.endswith("/max") or k.startswith("time/"):
                out[k] = float(maxed[i])
            else:
                out[k] = float(summed[i]) / self.world
        return out


def setup_distributed(device: str = "auto") -> Dist:
    """Join the process group that ``torchrun`` describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=dev)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (language and vision), FSDP2's sharding units."""
    blocks = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            if all(type(m) is type(module[0]) for m in module):
                blocks.extend(module)
    return blocks


def wrap_model(model: torch.nn.Module, strategy: str, d: Dist) -> torch.nn.Module:
    """The module the update runs forward/backward through: DDP wrapper or FSDP2-sharded model.

    Generation and no-gradient scoring use the returned module too for FSDP2 (its forward
    gathers the shards); for DDP they use the plain module (``wrapped.module``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"train.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not d.active or strategy in ds.ZERO_STAGES:  # DeepSpeed: wrap_optimizer
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [d.local_rank] if d.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    from vispo.models.adapt import vision_module_names

    for block in decoder_layers(model):
        fully_shard(block)
    # The vision tower is its own unit: transformers' generate computes image features by
    # calling it directly, outside the root module's forward (whose hook gathers root params).
    for name in vision_module_names(model):
        fully_shard(model.get_submodule(name))
    fully_shard(model)
    # FSDP2 makes the first unit to run forward the root. generate runs the vision tower
    # before the root, so initialise the root now, as its first forward would (torch 2.13 has
    # no public call for this; the error otherwise says "requires running forward through the
    # root module first").
    model._get_fsdp_state()._lazy_init()
    return model


def wrap_optimizer(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    strategy: str,
    d: Dist,
    *,
    micro_batch: int,
    grad_clip: float,
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """(module the update runs, optimizer the update steps): ``deepspeed.initialize`` for
    ``zero2``/``zero3`` under more than one rank; unchanged otherwise."""
    if strategy not in ds.ZERO_STAGES or not d.active:
        return model, optimizer
    return ds.initialize(model, optimizer, strategy, micro_batch=micro_batch, grad_clip=grad_clip)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") and hasattr(model, "no_sync") else model
