"""Reading checkpoint files and loading state dicts, with one error style.

Pickles are read with ``weights_only=True`` (a file carrying arbitrary Python objects is refused
and its code never runs); safetensors are read as they are. Wrapper prefixes (DDP ``module.``,
``torch.compile`` ``_orig_mod.``) and UniMed-CLIP's ``text_encoder.`` name are normalized.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from medclip.errors import MedclipError

log = logging.getLogger(__name__)

# Prefixes added by wrappers (DDP, torch.compile) that never belong to the open_clip module.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# UniMed-CLIP's fork names the HF text tower `text_encoder`; upstream open_clip calls it `text`.
KEY_RENAMES = (("text_encoder.", "text."),)


def read_weights_file(path: str | Path) -> dict:
    """The raw object in a weights file; pickles are read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise MedclipError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:
            raise MedclipError(f"cannot read safetensors file {path}: {exc}") from exc
    problem = torch_file_problem(path)
    if problem:
        raise MedclipError(f"cannot read checkpoint {path}: {problem}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise MedclipError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
            f"(weights_only=True): {first_line(exc)}"
        ) from exc
    except Exception as exc:  # a damaged file: torch's zip reader raises RuntimeError, others ValueError/EOFError
        raise MedclipError(f"cannot read checkpoint {path}: {first_line(exc)}") from exc


def torch_file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a torch.save file, from its bytes (None when it can be one).

    torch.save writes a zip archive (a legacy file: a pickle, protocol byte 0x80). Anything else, or a
    zip cut short, would reach torch.load's weights-only unpickler, whose message blames unsafe objects.
    """
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"PK\x03\x04":
        return None if zipfile.is_zipfile(path) else "its zip archive is incomplete (cut short or damaged)"
    if magic[:1] == b"\x80":
        return None
    return "not a PyTorch checkpoint (neither torch.save's zip archive nor a pickle)"


def first_line(exc: BaseException) -> str:
    """An exception's first message line (torch's read errors run over several), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def extract_state_dict(obj) -> dict:
    """The model state dict inside a checkpoint object (raw, wrapped or medclip training)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MedclipError("checkpoint holds no state dict (expected tensors, 'state_dict' or 'model')")
    return obj


def strip_wrapper_prefix(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def strip_wrappers(state_dict: dict) -> dict:
    """Keys without DDP ``module.`` / ``torch.compile`` ``_orig_mod.`` prefixes."""
    return {strip_wrapper_prefix(k): v for k, v in state_dict.items()}


def normalize_keys(state_dict: dict) -> dict:
    """Strip wrapper prefixes and map UniMed-CLIP names to open_clip's."""
    out = {}
    for key, value in state_dict.items():
        key = strip_wrapper_prefix(key)
        for old, new in KEY_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def load_weights(model: torch.nn.Module, state_dict: dict, allow_mismatch: bool = False, source: str = "",
                 context: str = "") -> None:
    """Load into ``model``; any missing/unexpected key is an error unless ``allow_mismatch``.

    ``context`` (e.g. ``"unimed-clip-b16 (UniMed-CLIP)"``) starts every error message, so a wrong
    checkpoint names the family that was expected.
    """
    state_dict = normalize_keys(state_dict)
    own = model.state_dict()
    # transformers >= 4.31 no longer keeps BERT's position_ids buffer; older checkpoints do.
    for key in [k for k in state_dict if k.endswith("embeddings.position_ids") and k not in own]:
        del state_dict[key]
    for name in ("logit_scale", "logit_bias"):
        if name in state_dict and name in own and state_dict[name].shape != own[name].shape:
            state_dict[name] = state_dict[name].reshape(own[name].shape)
    shape_errors = [f"{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state_dict.items() if k in own and v.shape != own[k].shape]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    where = f" from {source}" if source else ""
    lead = f"{context}: " if context else ""
    if shape_errors:
        raise MedclipError(f"{lead}checkpoint{where} does not fit the architecture: {len(shape_errors)} shape "
                           f"mismatches: {'; '.join(shape_errors[:3])}{'; ...' if len(shape_errors) > 3 else ''}")
    if (missing or unexpected) and not allow_mismatch:
        raise MedclipError(
            f"{lead}checkpoint{where} does not match the architecture: {len(missing)} missing keys "
            f"{_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)} "
            f"(pass allow_mismatch=True to load anyway)"
        )
    if missing or unexpected:
        log.warning("loading%s with %d missing keys %s and %d unexpected keys %s", where, len(missing),
                    _preview(missing), len(unexpected), _preview(unexpected))
    model.load_state_dict(state_dict, strict=False)


def _preview(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"
