"""Model FLOPs per sample (counted once with torch's FlopCounterMode) and device peaks for MFU."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16/fp16 tensor-core peaks in TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0,
               "L4": 121.0, "4090": 165.0, "3090": 71.0, "T4": 65.0}


def device_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_TFLOPS.items():
        if key in name:
            return peak
    return None


def train_flops_per_sample(forward, batch_size: int) -> float:
    """FLOPs of forward + backward for one sample, counted on a real forward of the model."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = forward()
        loss = sum(v.float().sum() for v in out.values() if isinstance(v, torch.Tensor) and v.requires_grad)
        loss.backward()
    return counter.get_total_flops() / batch_size
