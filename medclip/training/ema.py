"""An exponential moving average (EMA) of the trained weights (``optim.ema_decay``), kept in every checkpoint.

The shadow of each trainable parameter and of each persistent floating-point buffer (BatchNorm's running
statistics) of the unwrapped training module is a float32 copy; frozen parameters need none, and with LoRA
adapters the trainable parameters are the adapters. After each applied step every shadow moves towards its
weight in one fused lerp: ``shadow += (1 - decay) * (weight - shadow)``; a step the divergence guard skips
leaves the shadows as they were.

Under DDP every rank holds the same shadows (rank 0 saves them). Under FSDP2 a shadow is a DTensor sharded
like its parameter, updated shard by shard; the checkpoint holds it gathered to a full tensor (as the model's
full state dict is) and a resume shards it again, so a resumed run's EMA is bit for bit an uninterrupted one's.

``applied_to()`` puts the shadows in the module's tensors and the raw weights back afterwards: the final
evaluation and the export (``optim.ema_export``) read the EMA weights inside it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from medclip.errors import MedclipError

WARMUP_OFFSET = 10  # with warmup, update n uses min(decay, (1 + n) / (10 + n)), as TensorFlow's num_updates rule


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (a view: in-place changes reach the DTensor); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def tracked_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """What the EMA averages: trainable parameters and persistent floating-point buffers, by state-dict name.
    Non-persistent buffers (a causal mask of -inf) are constants, not weights."""
    persistent = module.state_dict(keep_vars=True).keys()
    tensors = {name: p for name, p in module.named_parameters() if p.requires_grad}
    tensors.update({name: b for name, b in module.named_buffers() if b.is_floating_point() and name in persistent})
    return tensors


class WeightEma:
    """The EMA of ``module``'s trained tensors, started from their current values."""

    def __init__(self, module: nn.Module, decay: float, warmup: bool = True):
        if not 0 < decay < 1:
            raise MedclipError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay, self.warmup = decay, warmup
        tensors = tracked_tensors(module)
        self.names, self.tensors = list(tensors), [t.detach() for t in tensors.values()]
        self.shadows = [t.to(torch.promote_types(t.dtype, torch.float32), copy=True) for t in self.tensors]
        self.updates = 0  # applied steps averaged so far

    def current_decay(self) -> float:
        """The decay of the next update: with warmup, early updates follow the weights closely, so the
        random (or starting) weights do not linger in a short run's average."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (WARMUP_OFFSET + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After an applied step: every shadow moves towards its weight."""
        weights = [_local(t) for t in self.tensors]
        shadows = [_local(s) for s in self.shadows]
        weights = [w if w.dtype == s.dtype else w.to(s.dtype) for w, s in zip(weights, shadows)]
        torch._foreach_lerp_(shadows, weights, 1.0 - self.current_decay())
        self.updates += 1

    @torch.no_grad()
    def reset(self) -> None:
        """Start again from the current weights (a resumed checkpoint without an EMA)."""
        torch._foreach_copy_([_local(s) for s in self.shadows], [_local(t) for t in self.tensors])
        self.updates = 0

    @contextlib.contextmanager
    @torch.no_grad()
    def applied_to(self):
        """The module holds the EMA weights inside the block, its raw weights again afterwards."""
        weights = [_local(t) for t in self.tensors]
        raw = [w.clone() for w in weights]
        torch._foreach_copy_(weights, [_local(s) for s in self.shadows])
        try:
            yield
        finally:
            torch._foreach_copy_(weights, raw)

    def state_dict(self) -> dict:
        """Every rank calls it (under FSDP2 the shards are gathered); the weights are full tensors on the CPU."""
        weights = {}
        for name, shadow in zip(self.names, self.shadows):
            full = shadow.full_tensor() if hasattr(shadow, "full_tensor") else shadow
            weights[name] = full.detach().cpu()
        return {"decay": self.decay, "updates": self.updates, "weights": weights}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """A checkpoint's EMA into the shadows (every rank; under FSDP2 each takes its shard)."""
        weights = state["weights"]
        differ = sorted(set(self.names) ^ set(weights))
        if differ:
            raise MedclipError(f"the checkpoint's EMA covers other tensors than this recipe trains ({len(differ)} "
                               f"differ, first {differ[0]}): resume with the freezing it was trained with")
        for name, shadow in zip(self.names, self.shadows):
            value = weights[name].reshape(shadow.shape).to(shadow.dtype)  # FSDP2 keeps scalars as 1-vectors
            if hasattr(shadow, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value.to(shadow.device), shadow.device_mesh, shadow.placements)
            _local(shadow).copy_(_local(value))
        self.updates = int(state["updates"])
