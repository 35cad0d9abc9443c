"""What a rehearsal's processes hand the trainer (``medclip pretrain``'s callbacks and checkpoint writer):

* ``KeyRecorder``: after every optimisation step, the step number and the sample keys of the process's
  batch are appended to a JSONL file (flushed, so a kill keeps them);
* ``FaultInjector`` (rank 0 of the killed run only): its ``write`` writes checkpoints as usual, except
  the one of a given step: there half of the serialised bytes reach the temporary file, and the process
  sends itself SIGKILL, the way a node dies mid-write. If no checkpoint is written at that step (a
  non-finite step skips it), the process dies after the next step instead.
"""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import torch

from medclip import jsonio
from medclip.training import checkpoint as ckpt
from medclip.training.callbacks import Callback


class KeyRecorder(Callback):
    def __init__(self, keys_file: Path):
        keys_file.parent.mkdir(parents=True, exist_ok=True)
        self.out = open(keys_file, "a", buffering=1)

    def on_step_end(self, trainer, batch: dict, losses: dict) -> None:
        self.out.write(jsonio.dumps({"step": trainer.step, "keys": [str(k) for k in batch["keys"]]}) + "\n")

    def on_run_end(self, trainer, results: dict) -> None:
        self.out.close()


class FaultInjector(Callback):
    def __init__(self, kill_at_checkpoint: int, fault_file: Path | None):
        self.kill_at, self.fault_file = kill_at_checkpoint, fault_file

    def on_step_end(self, trainer, batch: dict, losses: dict) -> None:
        if trainer.step > self.kill_at:  # the checkpoint of kill_at was not written: die now instead
            _die(self.fault_file, {"when": "start of step", "step": trainer.step + 1})

    def write(self, obj: dict, path: Path) -> None:
        """The checkpoint writer: ``checkpoint.save_atomic``, which this one cuts short at ``kill_at``."""
        serialize = self._half_then_die if obj["step"] == self.kill_at else None
        ckpt.save_atomic(obj, path, serialize=serialize)

    def _half_then_die(self, obj: dict, fh) -> None:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        half = data[: len(data) // 2]
        fh.write(half)
        fh.flush()
        os.fsync(fh.fileno())
        _die(self.fault_file, {"when": "writing checkpoint", "step": obj["step"], "file": str(fh.name),
                               "bytes_written": len(half), "bytes_total": len(data)})


def _die(fault_file: Path | None, record: dict) -> None:
    if fault_file is not None:
        fault_file.write_text(jsonio.dumps({**record, "pid": os.getpid(), "signal": "SIGKILL"}))
    os.kill(os.getpid(), signal.SIGKILL)
