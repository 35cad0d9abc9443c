"""`medclip.load` and `medclip.save`: every checkpoint form researchers have, one error style.

Accepted by :func:`load`:
  * a registered architecture name (medclip's or open_clip's), random weights unless
    ``checkpoint=`` names a weights file;
  * a directory in open_clip's hub format (``open_clip_config.json`` + weights), optionally
    written as ``local-dir:DIR``;
  * a medclip training checkpoint (``.pt``), which carries its own model config;
  * ``hf-hub:org/name``.
Weights files may be open_clip state dicts, UniMed-CLIP state dicts (``text_encoder.*``),
``{"state_dict": ...}`` wrappers, DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefixes.
"""

from __future__ import annotations

import json
import logging
import pickle
from copy import deepcopy
from pathlib import Path

import torch
from open_clip.model import (
    CLIP,
    CustomTextCLIP,
    convert_weights_to_lp,
    get_cast_dtype,
    set_model_preprocess_cfg,
)
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict
from safetensors.torch import load_file, save_file

from medclip.errors import MedclipError
from medclip.imaging import MedicalPreprocess, Window
from medclip.models import registry
from medclip.models.encoder import Encoder
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig

log = logging.getLogger(__name__)

HUB_CONFIG = "open_clip_config.json"
HUB_WEIGHTS = "open_clip_model.safetensors"
HEADS_WEIGHTS = "medclip_heads.safetensors"
HEADS_CONFIG = "medclip_heads.json"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16")
# Prefixes added by wrappers (DDP, torch.compile) that never belong to the open_clip module.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# UniMed-CLIP's fork names the HF text tower `text_encoder`; upstream open_clip calls it `text`.
KEY_RENAMES = (("text_encoder.", "text."),)


# ----------------------------------------------------------------------------- reading weights

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
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedclipError(
            f"refusing to load {path}: it holds Python objects other than tensors and plain containers "
            f"(weights_only=True): {first}"
        ) from exc
    except Exception as exc:
        raise MedclipError(f"cannot read checkpoint {path}: {exc}") from exc


def extract_state_dict(obj) -> dict:
    """The model state dict inside a checkpoint object (raw, wrapped or medclip training)."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                return extract_state_dict(obj[key])
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MedclipError("checkpoint holds no state dict (expected tensors, 'state_dict' or 'model')")
    return obj


def normalize_keys(state_dict: dict) -> dict:
    """Strip wrapper prefixes and map UniMed-CLIP names to open_clip's."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        for old, new in KEY_RENAMES:
            if key.startswith(old):
                key = new + key[len(old):]
        out[key] = value
    return out


def load_weights(model: torch.nn.Module, state_dict: dict, allow_mismatch: bool = False, source: str = "") -> None:
    """Load into ``model``; any missing/unexpected key is an error unless ``allow_mismatch``."""
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
    if shape_errors:
        raise MedclipError(f"checkpoint{where} does not fit the architecture: {len(shape_errors)} shape "
                           f"mismatches, e.g. {shape_errors[0]}")
    if (missing or unexpected) and not allow_mismatch:
        raise MedclipError(
            f"checkpoint{where} does not match the architecture: {len(missing)} missing keys "
            f"{_preview(missing)}, {len(unexpected)} unexpected keys {_preview(unexpected)} "
            f"(pass allow_mismatch=True to load anyway)"
        )
    if missing or unexpected:
        log.warning("loading%s with %d missing keys %s and %d unexpected keys %s", where, len(missing),
                    _preview(missing), len(unexpected), _preview(unexpected))
    model.load_state_dict(state_dict, strict=False)


def _preview(keys: list[str], n: int = 3) -> str:
    return "[" + ", ".join(keys[:n]) + (", ..." if len(keys) > n else "") + "]"


# ----------------------------------------------------------------------------- building

def resolve_config(name: str, hf_text_dir: str | Path | None = None) -> dict:
    cfg = registry.get_model_config(name)
    if cfg is None:
        known = ", ".join(registry.list_models())
        raise MedclipError(f"unknown model {name!r}: not a registered architecture (medclip: {known}; "
                           f"open_clip: see open_clip.list_models()), nor an existing file or directory")
    return with_text_dir(cfg, hf_text_dir)


def with_text_dir(model_cfg: dict, hf_text_dir: str | Path | None) -> dict:
    """Point an HF text tower at a local directory (config + tokenizer files) for offline use."""
    if hf_text_dir is None:
        return model_cfg
    text_cfg = model_cfg.get("text_cfg", {})
    if "hf_model_name" not in text_cfg:
        raise MedclipError("hf_text_dir given, but this model's text tower is not a HuggingFace model")
    local = Path(hf_text_dir)
    if not (local / "config.json").is_file():
        raise MedclipError(f"hf_text_dir {local} has no config.json (expected a HF model directory)")
    model_cfg = deepcopy(model_cfg)
    model_cfg["text_cfg"]["hf_model_name"] = str(local.resolve())
    model_cfg["text_cfg"]["hf_tokenizer_name"] = str(local.resolve())
    return model_cfg


def build_model(model_cfg: dict, device="cpu", precision: str = "fp32") -> torch.nn.Module:
    """An open_clip model from a config dict, random weights, no hub weight downloads."""
    if precision not in PRECISIONS:
        raise MedclipError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    cfg = deepcopy(model_cfg)
    text_cfg, vision_cfg = cfg.get("text_cfg", {}), cfg.get("vision_cfg", {})
    is_hf_text = "hf_model_name" in text_cfg
    if is_hf_text:
        text_cfg["hf_model_pretrained"] = False
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    custom_text = cfg.pop("custom_text", False) or is_hf_text
    cls = CustomTextCLIP if custom_text else CLIP
    try:
        model = cls(**cfg, cast_dtype=get_cast_dtype(precision))
    except OSError as exc:  # transformers cannot find the HF tower config (offline, wrong name)
        raise MedclipError(
            f"cannot build text tower {text_cfg.get('hf_model_name')!r}: {str(exc).splitlines()[0]} "
            f"(offline? pass hf_text_dir=DIR holding its config.json and tokenizer files)"
        ) from exc
    except TypeError as exc:
        raise MedclipError(f"invalid model config: {exc}") from exc
    device = torch.device(device)
    if precision in ("fp16", "bf16"):
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        model.to(device)
        convert_weights_to_lp(model, dtype=dtype)
    elif precision in ("pure_fp16", "pure_bf16"):
        model.to(device=device, dtype=torch.float16 if precision == "pure_fp16" else torch.bfloat16)
    else:
        model.to(device)
    return model


def build_tokenizer(model_cfg: dict):
    text_cfg = model_cfg.get("text_cfg", {})
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    name = text_cfg.get("hf_tokenizer_name")
    if name:
        try:
            return HFTokenizer(name, context_length=context_length, **kwargs)
        except OSError as exc:
            raise MedclipError(f"cannot load tokenizer {name!r}: {str(exc).splitlines()[0]} "
                               f"(offline? pass hf_text_dir=DIR)") from exc
    return SimpleTokenizer(context_length=context_length, **kwargs)


def build_preprocess_cfg(model: torch.nn.Module, overlay: dict | None = None) -> dict:
    cfg = merge_preprocess_dict(PreprocessCfg(), overlay or {})
    cfg["size"] = getattr(model.visual, "image_size", cfg["size"])
    if isinstance(cfg["size"], (tuple, list)):
        cfg["size"] = list(cfg["size"])
    return cfg


def _encoder(model, model_cfg, preprocess_cfg, name, precision, window, heads=None) -> Encoder:
    set_model_preprocess_cfg(model, preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return Encoder(model, MedicalPreprocess(transform, window), build_tokenizer(model_cfg), model_cfg,
                   preprocess_cfg, name=name, precision=precision, heads=heads)


def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_heads(config: dict, state_dict: dict | None, device) -> ConceptHeads:
    try:
        heads = ConceptHeads(ConceptHeadsConfig(**config))
    except TypeError as exc:
        raise MedclipError(f"invalid PC-Align heads config: {exc}") from exc
    if state_dict is not None:
        load_weights(heads, state_dict, source="PC-Align heads")
    return heads.to(device)


# ----------------------------------------------------------------------------- public API

def load(
    name_or_path: str | Path,
    device=None,
    precision: str | None = None,
    checkpoint: str | Path | None = None,
    allow_mismatch: bool = False,
    hf_text_dir: str | Path | None = None,
    window: Window | None = None,
) -> Encoder:
    """Load an encoder. See the module docstring for what ``name_or_path`` may be.

    ``checkpoint`` adds weights to a registered architecture name; ``hf_text_dir`` points an HF
    text tower at a local directory (offline); ``window`` sets a default intensity window for
    16-bit and DICOM inputs.
    """
    device = _default_device(device)
    precision = precision or "fp32"
    ref = str(name_or_path)
    if ref.startswith("hf-hub:"):
        return _load_hub_dir(_download_hub(ref[len("hf-hub:"):]), ref, device, precision, allow_mismatch,
                             hf_text_dir, window)
    if ref.startswith("local-dir:"):
        ref = ref[len("local-dir:"):]
    path = Path(ref)
    if path.is_dir():
        return _load_hub_dir(path, ref, device, precision, allow_mismatch, hf_text_dir, window)
    if path.suffix in WEIGHT_SUFFIXES or path.exists():
        if checkpoint is not None:
            raise MedclipError("give either a checkpoint file as the first argument or checkpoint=, not both")
        return _load_training_checkpoint(path, device, precision, allow_mismatch, hf_text_dir, window)
    model_cfg = resolve_config(ref, hf_text_dir)
    model = build_model(model_cfg, device, precision)
    heads = None
    if checkpoint is not None:
        obj = read_weights_file(checkpoint)
        load_weights(model, extract_state_dict(obj), allow_mismatch, source=str(checkpoint))
        if isinstance(obj, dict) and isinstance(obj.get("heads"), dict) and "heads_config" in obj:
            heads = build_heads(obj["heads_config"], obj["heads"], device)
    return _encoder(model, model_cfg, build_preprocess_cfg(model), ref, precision, window, heads)


def encoder_from_state(model_cfg: dict, state_dict: dict, heads_config: dict | None = None,
                       heads_state: dict | None = None, device="cpu", name: str = "",
                       preprocess_cfg: dict | None = None) -> Encoder:
    """An Encoder from in-memory weights (the trainer's snapshot for evaluation and export)."""
    model = build_model(model_cfg, device, "fp32")
    load_weights(model, state_dict, source=name or "state dict")
    heads = build_heads(heads_config, heads_state, device) if heads_config is not None else None
    return _encoder(model, model_cfg, build_preprocess_cfg(model, preprocess_cfg), name, "fp32", None, heads)


def _download_hub(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id))
    except Exception as exc:
        raise MedclipError(f"cannot fetch hf-hub:{model_id}: {str(exc).splitlines()[0]}") from exc


def _load_hub_dir(directory: Path, name, device, precision, allow_mismatch, hf_text_dir, window) -> Encoder:
    config_path = directory / HUB_CONFIG
    if not config_path.is_file():
        raise MedclipError(f"{directory} is not a model directory: {HUB_CONFIG} is missing")
    try:
        hub_cfg = json.loads(config_path.read_text())
        model_cfg = hub_cfg["model_cfg"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise MedclipError(f"{config_path} is not a valid open_clip config: {exc}") from exc
    model_cfg = with_text_dir(model_cfg, hf_text_dir)
    weights = [directory / n for n in (HUB_WEIGHTS, "open_clip_pytorch_model.bin") if (directory / n).is_file()]
    if not weights:
        raise MedclipError(f"{directory} holds no weights ({HUB_WEIGHTS} or open_clip_pytorch_model.bin)")
    model = build_model(model_cfg, device, precision)
    load_weights(model, extract_state_dict(read_weights_file(weights[0])), allow_mismatch, source=str(weights[0]))
    heads = None
    if (directory / HEADS_CONFIG).is_file():
        heads = build_heads(json.loads((directory / HEADS_CONFIG).read_text()),
                            read_weights_file(directory / HEADS_WEIGHTS), device)
    preprocess_cfg = build_preprocess_cfg(model, hub_cfg.get("preprocess_cfg"))
    return _encoder(model, model_cfg, preprocess_cfg, str(name), precision, window, heads)


def _load_training_checkpoint(path: Path, device, precision, allow_mismatch, hf_text_dir, window) -> Encoder:
    obj = read_weights_file(path)
    model_cfg = obj.get("model_cfg") if isinstance(obj, dict) else None
    if not isinstance(model_cfg, dict):
        raise MedclipError(
            f"{path} carries no model config (a plain open_clip or UniMed-CLIP state dict): "
            f"name its architecture, e.g. medclip.load('medclip-vit-b16-biomedbert', checkpoint='{path}')"
        )
    model_cfg = with_text_dir(model_cfg, hf_text_dir)
    model = build_model(model_cfg, device, precision)
    load_weights(model, extract_state_dict(obj), allow_mismatch, source=str(path))
    heads = None
    if isinstance(obj.get("heads"), dict) and isinstance(obj.get("heads_config"), dict):
        heads = build_heads(obj["heads_config"], obj["heads"], device)
    return _encoder(model, model_cfg, build_preprocess_cfg(model, obj.get("preprocess_cfg")), str(path),
                    precision, window, heads)


def _contiguous(state_dict: dict) -> dict:
    # safetensors refuses shared or strided storage; clone to plain contiguous tensors.
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


def save(encoder: Encoder, directory: str | Path) -> Path:
    """Write open_clip's hub format (safetensors) so ``open_clip`` loads it as ``local-dir:DIR``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous(encoder.model.state_dict()), str(out / HUB_WEIGHTS))
    config = {"model_cfg": encoder.model_cfg, "preprocess_cfg": encoder.preprocess_cfg}
    (out / HUB_CONFIG).write_text(json.dumps(config, indent=2))
    hf_tokenizer = getattr(encoder.tokenizer, "tokenizer", None)
    if hf_tokenizer is not None and hasattr(hf_tokenizer, "save_pretrained"):
        # open_clip reads an HF tokenizer of a local-dir model from the directory itself.
        hf_tokenizer.save_pretrained(str(out))
    if encoder.heads is not None:
        save_file(_contiguous(encoder.heads.state_dict()), str(out / HEADS_WEIGHTS))
        (out / HEADS_CONFIG).write_text(json.dumps(encoder.heads.config.to_dict(), indent=2))
    return out
