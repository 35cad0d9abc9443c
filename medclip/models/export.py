"""``medclip.save``: open_clip's hub format, self-contained and free of absolute paths.

An export holds ``open_clip_config.json`` + ``open_clip_model.safetensors``, the tokenizer files, the HF
text tower's ``config.json`` and, for timm towers without a registry name (sizes carried by a timm
config, e.g. MedSigLIP at 448 px), ``timm_vision/config.json``. Towers are named portably: an HF text
tower by its hub id when it is the published one (open_clip fetches that config like it does for
BiomedCLIP), otherwise ``"."``; a timm config as ``local-dir:timm_vision``. open_clip resolves those
relative names against the working directory, medclip against the export directory, so
``medclip.load(DIR)`` needs nothing outside DIR.
"""

from __future__ import annotations

import json
import shutil
from copy import deepcopy
from pathlib import Path

from safetensors.torch import save_file

from medclip import jsonio
from medclip.errors import MedclipError
from medclip.models import tower_dirs

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
HEADS_WEIGHTS = "medclip_heads.safetensors"
HEADS_CONFIG = "medclip_heads.json"
TIMM_DIR = "timm_vision"
BUNDLED = "."  # a tower described by files in the export directory itself


def _contiguous(state_dict: dict) -> dict:
    # safetensors refuses shared or strided storage; clone to plain contiguous tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


def portable_model_cfg(encoder, out: Path) -> dict:
    """The model config with tower references rewritten for ``out``; writes the tower files there."""
    cfg = deepcopy(encoder.model_cfg)
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    tower_name = getattr(encoder, "text_tower_name", None)
    if "hf_model_name" in text_cfg:
        encoder.model.text.config.save_pretrained(str(out))
        text_cfg["hf_model_name"] = tower_name or BUNDLED
    hf_tokenizer = getattr(encoder.tokenizer, "tokenizer", None)
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        # open_clip reads the tokenizer of a local-dir model from the directory itself.
        hf_tokenizer.save_pretrained(str(out))
        if "hf_tokenizer_name" in text_cfg:
            text_cfg["hf_tokenizer_name"] = tower_name if tower_name and "hf_model_name" in text_cfg else BUNDLED
    timm_dir = tower_dirs.timm_local_dir(vision_cfg.get("timm_model_name"))
    if timm_dir is not None:
        (out / TIMM_DIR).mkdir(exist_ok=True)
        shutil.copyfile(timm_dir / "config.json", out / TIMM_DIR / "config.json")
        vision_cfg["timm_model_name"] = tower_dirs.TIMM_PREFIX + TIMM_DIR
    return cfg


def read_hub_config(directory: Path) -> dict:
    """``DIR/open_clip_config.json`` as a dict holding a ``model_cfg`` object; a one-line error otherwise."""
    path = Path(directory) / HUB_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MedclipError(f"{path} is not a valid open_clip config: {exc}") from exc
    if not isinstance(config, dict):
        raise MedclipError(f"{path} is not a valid open_clip config: it holds a JSON {type(config).__name__}, "
                           f"expected an object with 'model_cfg'")
    if not isinstance(config.get("model_cfg"), dict):
        raise MedclipError(f"{path} is not a valid open_clip config: no 'model_cfg' object")
    return config


def resolve_bundled(model_cfg: dict, directory: Path) -> dict:
    """The inverse at load time: tower files inside ``directory`` win over names that need a hub."""
    cfg = deepcopy(model_cfg)
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    if "hf_model_name" in text_cfg and ((directory / "config.json").is_file() or text_cfg["hf_model_name"] == BUNDLED):
        text_cfg["hf_model_name"] = str(directory.resolve())
    if "hf_tokenizer_name" in text_cfg and (tower_dirs.has_tokenizer(directory) or text_cfg["hf_tokenizer_name"] == BUNDLED):
        text_cfg["hf_tokenizer_name"] = str(directory.resolve())
    timm_dir = tower_dirs.timm_local_dir(vision_cfg.get("timm_model_name"))
    if timm_dir is not None and not timm_dir.is_absolute():
        vision_cfg["timm_model_name"] = tower_dirs.TIMM_PREFIX + str((directory / timm_dir).resolve())
    return cfg


def save(encoder, directory: str | Path) -> Path:
    """Write ``encoder`` in open_clip's hub format to ``directory``; returns the directory.

    The export loads with ``medclip.load(DIR)`` and with plain open_clip,
    ``open_clip.create_model_and_transforms("local-dir:DIR")`` (weights as safetensors, tokenizer and
    tower configs beside them, no absolute paths). PC-Align heads, if any, go beside it in
    ``medclip_heads.safetensors`` + ``medclip_heads.json`` (open_clip ignores them).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(encoder.model.state_dict()), str(out / HUB_WEIGHTS))
    config = {"model_cfg": portable_model_cfg(encoder, out), "preprocess_cfg": encoder.preprocess_cfg}
    (out / HUB_CONFIG).write_text(jsonio.dumps(config, indent=2))
    if encoder.heads is not None:
        save_file(_contiguous(encoder.heads.state_dict()), str(out / HEADS_WEIGHTS))
        (out / HEADS_CONFIG).write_text(jsonio.dumps(encoder.heads.config.to_dict(), indent=2))
    return out
