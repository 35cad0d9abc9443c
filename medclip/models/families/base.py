"""What every family reader returns, and the checks they share.

A reader turns a published checkpoint (a file or a snapshot directory, as the family publishes it)
into a :class:`Converted`: an open_clip model config, a state dict in open_clip's key names, the
family's preprocessing and, where the family has concept heads, medclip's PC-Align heads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medclip.errors import MedclipError
from medclip.models.weights import extract_state_dict, read_weights_file, strip_wrappers

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Converted:
    model_cfg: dict
    state_dict: dict[str, torch.Tensor]
    preprocess_cfg: dict
    # Name to write as `hf_model_name` in exports: the hub id when the text tower is the published
    # one, None when the export must carry its own tower config (named "." inside the export).
    text_tower_name: str | None = None
    heads_config: dict | None = None
    heads_state: dict | None = None
    notes: list[str] = field(default_factory=list)


class FamilyError(MedclipError):
    """A checkpoint that is not what the named entry expects (other family, missing file, shapes)."""


def preview(keys, n: int = 3) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's state dict, wrappers (`state_dict`, DDP `module.`) removed."""
    return strip_wrappers(extract_state_dict(read_weights_file(path)))


def find_file(source: Path, names: tuple[str, ...], entry: str, what: str, patterns: tuple[str, ...] = ()) -> Path:
    """``source`` itself if it is a file, else the first of ``names`` inside the directory, else the
    one file matching ``patterns`` (several matches: an error listing them)."""
    if source.is_file():
        return source
    if not source.is_dir():
        raise FamilyError(f"{entry}: checkpoint not found: {source}")
    for name in names:
        if (source / name).is_file():
            return source / name
    matches = sorted({p for pattern in patterns for p in source.glob(pattern) if p.is_file()})
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise FamilyError(f"{entry}: {source} holds several candidate checkpoints ({preview([m.name for m in matches])}); "
                          f"pass the file itself")
    present = ", ".join(sorted(p.name for p in source.iterdir())[:6]) or "nothing"
    expected = " or ".join([*names, *patterns])
    raise FamilyError(f"{entry}: {source} has no {what} (expected {expected}; found {present})")


def count_indexed(keys, prefix: str) -> int:
    """How many numbered children ``prefix{N}.`` the keys hold (layers, blocks)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def mlp_ratio(hidden: int, width: int) -> float:
    """A ratio that gives back ``hidden`` as ``int(width * ratio)`` (open_clip's and timm's rounding)."""
    return float(hidden // width) if hidden % width == 0 else (hidden + 0.5) / width
