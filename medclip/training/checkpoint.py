"""Atomic, rotating training checkpoints that `medclip.load` and `--resume latest` read back.

A checkpoint is one `.pt` file readable with ``weights_only=True``: tensors, numbers, strings and
containers only (numpy RNG state is stored as a tensor for that reason).
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from medclip.errors import MedclipError
from medclip.models.loading import read_weights_file

CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """'latest' -> newest complete checkpoint in output_dir (None if there is none yet); else a path."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not path.is_file():
        raise MedclipError(f"--resume: checkpoint not found: {path}")
    return path


def save_atomic(obj: dict, path: Path) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target.

    A crash at any point leaves either the old file set or the new one, never a truncated file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def rotate(output_dir: str | Path, keep: int) -> None:
    for old in list_checkpoints(output_dir)[:-keep]:
        old.unlink(missing_ok=True)


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


def read_checkpoint(path: Path) -> dict:
    obj = read_weights_file(path)
    if not isinstance(obj, dict) or "model" not in obj or "step" not in obj:
        raise MedclipError(f"{path} is not a medclip training checkpoint (no model/step)")
    return obj
