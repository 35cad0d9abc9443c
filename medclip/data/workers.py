"""Loader worker processes: handing batches to the parent cheaply, and dying with the parent."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

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


PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCHDOG_SECONDS = 1.0


def exit_with_parent(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: end this worker as soon as the process that started it dies.

    A worker of a SIGKILLed trainer otherwise lives on: torch's own check of the parent runs only
    between tasks, and a worker blocked on sending its batches (the pipe stays open, other workers
    hold it) waits forever at exit — measured: 15+ minutes at ~1 GB each. On Linux the kernel kills
    the worker with its parent (PR_SET_PDEATHSIG; strictly, with the parent *thread* that started it:
    iterate the stream from a thread that outlives the epoch, as the trainer's main thread does); a
    watchdog thread polling the parent's pid covers other systems.
    """
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
        except (OSError, AttributeError):  # no libc prctl: the watchdog alone
            pass
    threading.Thread(target=_watch_parent, args=(parent,), name="medclip-parent-watchdog", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_SECONDS)
    os._exit(1)  # no cleanup: the parent that would read our results is gone
