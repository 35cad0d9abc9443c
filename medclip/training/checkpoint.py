"""Atomic, rotating training checkpoints that `medclip.load` and `--resume latest` read back.

A checkpoint is one `.pt` file readable with ``weights_only=True``: tensors, numbers, strings and
containers only (numpy RNG state is stored as a tensor for that reason). Each records whether its
weights are finite (``"finite"``), and ``--resume latest`` never picks a non-finite one. Which checkpoint
is good to go back to is decided by the trainer (the step after it must be finite, see ``rotate``).
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from medclip.errors import MedclipError
from medclip.models.weights import first_line, read_weights_file, torch_file_problem

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")
TEMP_RE = re.compile(r"^\.step_\d+\.pt\.tmp-(\d+)$")  # save_atomic's partial file: .step_N.pt.tmp-PID
DISK_MARGIN = 1.05  # pickle records and zip headers on top of the tensor bytes


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_problem(path: Path) -> str | None:
    """Why `--resume latest` must not pick this checkpoint (None when it may).

    Reads the checkpoint's own ``finite`` record lazily (mmap, no tensor data); files from before the
    record count as finite. A file that cannot be read at all (damaged after it was written: a copy cut
    short, a bad disk) is a reason too, so the previous checkpoint is used instead of a traceback.
    """
    problem = torch_file_problem(path)
    if problem:
        return f"unreadable: {problem}"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # damage inside a complete archive: torch raises several exception types
        return f"unreadable: {first_line(exc)}"
    return not_a_training_checkpoint(obj) or (None if obj.get("finite", True) else "non-finite weights")


def latest_resumable(output_dir: str | Path) -> Path | None:
    """The newest checkpoint `--resume latest` may pick; each newer one passed over is logged with why."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("--resume latest: passing over %s: %s", path, problem)
    return None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'latest' -> newest usable checkpoint in output_dir (None if there is none); else a path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        path = latest_resumable(output_dir)
        if found and path is None:
            raise MedclipError(f"--resume latest: no checkpoint in {checkpoint_dir(output_dir)} can be resumed "
                               f"(non-finite weights or unreadable, see the warnings); start again without --resume")
        return path
    path = Path(resume)
    if not path.is_file():
        raise MedclipError(f"--resume: checkpoint not found: {path}")
    return path


def all_finite(*state_dicts: dict | None) -> bool:
    """True when every floating-point tensor of the state dicts is finite (one host sync)."""
    flags = [torch.isfinite(t).all() for sd in state_dicts if sd for t in sd.values()
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def tensor_bytes(obj) -> int:
    """Bytes of all tensors in a nested checkpoint object: what its file needs, give or take the headers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def save_atomic(obj: dict, path: Path, serialize=None) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    ``serialize(obj, file)`` writes the object into the open temporary file (default ``torch.save``; the
    rehearsal's fault injector stops half-way).

    A crash at any point leaves either the old file set or the new one, never a truncated file. A full
    disk (or any failed write) is one MedclipError that says how much space a checkpoint needs; the
    previous checkpoints are untouched and the partial file is removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    need = int(tensor_bytes(obj) * DISK_MARGIN)
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise MedclipError(f"not enough disk space for checkpoint {path}: it needs about {_size(need)}, "
                           f"{path.parent} has {_size(free)} free (free some space, or lower run.keep_checkpoints)")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            (serialize or torch.save)(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's zip writer reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "the write failed"
        raise MedclipError(f"could not write checkpoint {path} ({reason}): a checkpoint needs about {_size(need)}, "
                           f"{path.parent} has {_size(free)} free; earlier checkpoints are intact") from exc
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Partial files of writers that no longer run (a killed run's `.step_N.pt.tmp-PID`)."""
    folder = checkpoint_dir(output_dir)
    removed = []
    for path in folder.iterdir() if folder.is_dir() else ():
        m = TEMP_RE.match(path.name)
        if m and not process_alive(int(m.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d partial checkpoint file(s) of an interrupted run in %s", len(removed), folder)
    return removed


def process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # not writing yet: a leftover of an earlier process with our id
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def rotate(output_dir: str | Path, keep: int, protect: tuple[Path | None, ...] = ()) -> None:
    """Keep the newest ``keep`` checkpoints, and those in ``protect`` (the run's newest one, the newest one
    proven good) even when files of higher steps sort after them."""
    kept = {Path(p).resolve() for p in protect if p is not None}
    for old in list_checkpoints(output_dir)[:-keep]:
        if old.resolve() not in kept:
            old.unlink(missing_ok=True)


def set_aside(output_dir: str | Path, from_step: int) -> list[Path]:
    """Rename checkpoints of ``from_step`` and later to `step_N.diverged.pt`: their weights lead to non-finite
    steps, so `--resume latest` must not pick them (kept, not deleted, for inspection)."""
    moved = []
    for path in list_checkpoints(output_dir):
        if int(CHECKPOINT_RE.match(path.name).group(1)) >= from_step:
            target = path.with_name(path.name.replace(".pt", ".diverged.pt"))
            path.rename(target)
            moved.append(target)
    return moved


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def not_a_training_checkpoint(obj) -> str | None:
    """Why a loaded object is not a medclip training checkpoint (None when it is one)."""
    if not isinstance(obj, dict) or "model" not in obj or "step" not in obj:
        return "not a medclip training checkpoint (no model/step)"
    return None


def read_checkpoint(path: Path) -> dict:
    obj = read_weights_file(path)
    problem = not_a_training_checkpoint(obj)
    if problem:
        raise MedclipError(f"{path} is {problem}")
    return obj


class CheckpointKeeper:
    """Which of the run's checkpoints to keep, and which one is good to go back to (rank 0's files).

    A checkpoint is proven good when the step after it is finite: its weights train on. Older
    checkpoints are rotated away only then, so a checkpoint whose weights lead to divergence (finite
    but ruined by a huge update, or non-finite) never costs the last good one.
    """

    def __init__(self, output_dir: Path, keep: int, is_main: bool, write=save_atomic):
        self.output_dir, self.keep, self.is_main = output_dir, keep, is_main
        self.write = write  # (checkpoint object, path) -> None on rank 0: ``save_atomic``, or a caller's writer
        self.pending: tuple[int, Path] | None = None  # written (or resumed from), not yet proven
        self.good: Path | None = None
        self.newest: Path | None = None  # this run's latest checkpoint: never rotated away

    def written(self, step: int, path: Path) -> None:
        self.pending = (step, path)
        self.newest = path

    def after_step(self, step: int, finite: bool) -> None:
        if self.pending is None or step != self.pending[0] + 1:
            return
        if finite:
            self.good = self.pending[1]
            if self.is_main:
                rotate(self.output_dir, self.keep, protect=(self.good, self.newest))
        self.pending = None

    def finish(self) -> None:
        """After the final checkpoint: the newest ``keep`` stay, and the last proven-good one."""
        if self.is_main:
            rotate(self.output_dir, self.keep, protect=(self.good, self.newest))

    def diverged(self, first_bad_step: int) -> Path | None:
        """Set aside the checkpoints the bad steps started from; the newest finite one left (rank 0)."""
        if not self.is_main:
            return None
        set_aside(self.output_dir, from_step=first_bad_step - 1)
        return latest_resumable(self.output_dir)
