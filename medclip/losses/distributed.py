"""Which rank we are and how to exchange loss inputs across ranks with gradients.

All losses take an optional ``World``; ``None`` means "whatever torch.distributed says" (a single
process when it is not initialized). Tests pass ``World.single()`` to compute the reference loss on
the concatenated batch inside an initialized process group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @staticmethod
    def single() -> World:
        return World(0, 1)

    @staticmethod
    def current() -> World:
        if dist.is_available() and dist.is_initialized():
            return World(dist.get_rank(), dist.get_world_size())
        return World.single()


def resolve(world: World | None) -> World:
    return World.current() if world is None else world


def all_gather_with_grad(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    """One tensor per rank; gradients flow back to the owning rank (summed over all ranks' losses)."""
    if world.size == 1:
        return [tensor]
    return list(_GatherWithGrad.apply(tensor.contiguous()))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's tensor.

    Written on torch.distributed's public collectives: torch 2.14 deprecates the autograd-aware
    ``torch.distributed.nn.all_gather`` (open_clip's choice) in favour of a private module. The backward
    all-reduces the gradients of every rank's part and keeps this rank's: gloo has no reduce_scatter, and
    the gathered tensors are embeddings ([N, D]), so one code path for every backend costs little.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor):
        out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(out, tensor)
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:
        summed = torch.stack(grads)
        dist.all_reduce(summed)
        return summed[dist.get_rank()]


def all_gather_no_grad(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    if world.size == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(out, tensor.contiguous())
    return out


def all_reduce_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum of a (gradient-free) tensor over ranks, e.g. a normaliser."""
    if world.size == 1:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_max(value: int, world: World, device=None) -> int:
    if world.size == 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
