"""Process-group setup from torchrun or SLURM environments, and model wrapping (DDP / FSDP2)."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from medclip.errors import MedclipError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host(nodelist: str) -> str:
    """'gpu[01-04,07],cpu1' -> 'gpu01' (what `scontrol show hostnames` would list first)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def detect_env(environ=None) -> DistEnv:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; under plain `srun`, SLURM_* carry the same facts."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)), "slurm")
    return DistEnv()


def init_distributed(env: DistEnv, device: torch.device) -> None:
    if not env.distributed or dist.is_initialized():
        return
    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(env.rank), str(env.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    log.info("process group: backend=%s rank=%d/%d (%s)", backend, env.rank, env.world_size, env.launcher)


def pick_device(choice: str, env: DistEnv) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise MedclipError("run.device is cuda, but no CUDA device is available")
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, device: torch.device,
               find_unused: bool = False) -> torch.nn.Module:
    """DDP by default; FSDP2 (`fully_shard`) shards each transformer block, then the root."""
    if not env.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        vectorize_scalar_params(model)
        for module in list(model.modules()):
            if type(module).__name__ in _BLOCK_TYPES:
                fully_shard(module)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # find_unused: PC-Align heads sit idle before objective.pc_start_step.
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def vectorize_scalar_params(model: torch.nn.Module) -> None:
    """fully_shard cannot shard 0-d parameters (logit scale/bias): make them 1-element vectors."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.ndim == 0:
                setattr(module, name, torch.nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))


# Transformer blocks of open_clip, timm and HF BERT towers: the unit FSDP shards.
_BLOCK_TYPES = {"ResidualAttentionBlock", "Block", "BertLayer", "CustomResidualAttentionBlock"}


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def gather_objects(obj) -> list:
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (and a barrier): how rank 0 tells the others that its write or its
    evaluation failed, so that all stop with the same message instead of waiting at a barrier forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
