"""Model FLOPs per sample (counted once with torch's FlopCounterMode on a copy) and device peaks for MFU."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0,
               "L4": 121.0, "4090": 165.0, "3090": 71.0, "T4": 65.0}
COUNT_SAMPLES = 8  # FLOPs per sample are counted on this many samples (the towers' cost is per sample)


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def train_flops_per_sample(forward: Callable[[], dict], batch_size: int) -> float:
    """FLOPs of forward + backward for one sample; ``forward`` returns the loss terms of ``batch_size`` samples."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = forward()
        loss = sum(v.float().sum() for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad)
        loss.backward()
    return counter.get_total_flops() / batch_size


class TrainFlops:
    """FLOPs per training sample, measured once on a deep copy of the (unwrapped) train module.

    A training-mode forward and backward of the model itself would move BatchNorm statistics, draw
    dropout masks from the RNG and leave gradients behind: the copy takes all of that, and the RNG is
    forked, so a run with MFU reporting trains exactly as one without. The copy is made before the
    module is wrapped for DDP / FSDP (a sharded module cannot be copied) and freed after counting.
    """

    def __init__(self, module: torch.nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]):
        self._copy: torch.nn.Module | None = copy.deepcopy(module)
        self._autocast = autocast
        self.per_sample: float | None = None

    def count(self, batch: dict, step: int) -> float:
        """``batch`` on the module's device, normalised: the first samples are counted."""
        if self.per_sample is None:
            module, n = self._copy, min(COUNT_SAMPLES, len(batch["images"]))
            part = {k: v[:n] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()}
            devices = [batch["images"].device] if batch["images"].is_cuda else []
            with torch.random.fork_rng(devices=devices):
                def forward():
                    with self._autocast():
                        return module.losses(module(part, step), step)

                self.per_sample = train_flops_per_sample(forward, n)
            self._copy = None
        return self.per_sample
