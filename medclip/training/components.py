"""Glue between the engine and the library: the trained module, batch splitting, data, eval, export."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from medclip.losses import Features, Objective, ObjectiveConfig, clamp_logit_scales_, concat_features

log = logging.getLogger(__name__)


class TrainModule(nn.Module):
    """The open_clip model plus PC-Align heads; forward = both towers once (what DDP/FSDP wrap)."""

    def __init__(self, model: nn.Module, heads: nn.Module | None, objective: ObjectiveConfig):
        super().__init__()
        self.model = model
        self.heads = heads
        self.objective = Objective(objective)

    def forward(self, batch: dict, step: int) -> dict:
        features = self.objective.forward_features(self.model, self.heads, batch, step)
        # A plain dict of tensors: DDP and FSDP look for tensors in the outputs they return.
        return {f.name: getattr(features, f.name) for f in dataclasses.fields(features)}

    def losses(self, features: dict, step: int, live_scales: bool = True) -> dict:
        model, heads = self.model, self.heads
        if not live_scales:  # this micro-batch must not add to the scale/bias gradients again
            model = SimpleNamespace(logit_scale=model.logit_scale.detach(),
                                    logit_bias=_detached(getattr(model, "logit_bias", None)))
            if heads is not None:
                heads = SimpleNamespace(logit_scale=heads.logit_scale.detach(),
                                        logit_bias=heads.logit_bias.detach(), config=heads.config)
        return self.objective.losses(Features(**features), step, model, heads)

    @staticmethod
    def merge_features(cached: list[dict], live_index: int, live: dict) -> dict:
        parts = [Features(**(live if i == live_index else c)) for i, c in enumerate(cached)]
        merged = concat_features(parts)
        return {f.name: getattr(merged, f.name) for f in dataclasses.fields(merged)}

    def clamp_scales(self, max_log_scale: float) -> None:
        clamp_logit_scales_(self.model, self.heads, max_log_scale=max_log_scale)


def _detached(t):
    return t.detach() if t is not None else None


def split_batch(batch: dict, parts: int) -> list[dict]:
    """k equal micro-batches along the batch dimension (lists such as `keys` are split alike)."""
    if parts == 1:
        return [batch]
    size = len(batch["images"])
    if size % parts:
        raise ValueError(f"batch of {size} does not split into {parts} equal micro-batches")
    step = size // parts
    out = []
    for i in range(parts):
        sl = slice(i * step, (i + 1) * step)
        out.append({k: v[sl] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()})
    return out


def _placeholder(*_args, **_kwargs):
    raise NotImplementedError


def build_data(*a, **k):
    raise NotImplementedError


evaluate = export_encoder = _placeholder
__all__ = ["TrainModule", "split_batch", "Path", "log"]
