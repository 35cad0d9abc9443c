"""Loader worker processes: handing batches to the parent cheaply, and dying with the parent."""

from __future__ import annotations

import numpy as np
import torch

SMALL_TENSOR_BYTES = 1 << 20


def for_transfer(batch: dict, worker_info) -> dict:
    """In a worker: small tensors as NumPy arrays, which the DataLoader pickles inline.

    Every tensor a worker sends gets a shared-memory segment of its own, created in the worker
    and fetched by the parent over a new socket connection (~0.4 ms each here); text, spans,
    concept ids and masks are a few KB. The images (allocated in shared memory) stay tensors.
    """
    if worker_info is None:
        return batch
    return {k: v.numpy() if isinstance(v, torch.Tensor) and v.nbytes < SMALL_TENSOR_BYTES else v
            for k, v in batch.items()}


def as_is(item):
    """The DataLoader's per-item collate_fn: items are whole batches already (its default would turn
    the NumPy arrays of :func:`for_transfer` back into tensors in the worker)."""
    return item


def from_transfer(batch: dict) -> dict:
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
