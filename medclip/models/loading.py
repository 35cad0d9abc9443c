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
import os
import sys
import warnings
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

from medclip.errors import MedclipError
from medclip.imaging import MedicalPreprocess, Window
from medclip.models import export, families, pretrained, registry
from medclip.models.encoder import Encoder
from medclip.models.export import HEADS_CONFIG, HEADS_WEIGHTS, HUB_CONFIG, HUB_WEIGHTS
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig
from medclip.models.weights import (  # noqa: F401  (re-exported: trainer, checkpoint)
    extract_state_dict,
    load_weights,
    normalize_keys,
    read_weights_file,
    strip_wrappers,
)

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
PRECISIONS = ("fp32", "fp16", "bf16", "pure_fp16", "pure_bf16", "amp", "amp_bf16")


# ----------------------------------------------------------------------------- building

def resolve_config(name: str, hf_text_dir: str | Path | None = None) -> dict:
    cfg = registry.get_model_config(name)
    if cfg is None:
        known = ", ".join(registry.list_models())
        raise MedclipError(f"unknown model {name!r}: not a named pretrained model ({', '.join(pretrained.ENTRIES)}), "
                           f"a registered architecture (medclip: {known}; open_clip: see open_clip.list_models()), "
                           f"nor an existing file or directory")
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


def _encoder(model, model_cfg, preprocess_cfg, name, precision, window, heads=None,
             text_tower_name: str | None = None) -> Encoder:
    set_model_preprocess_cfg(model, preprocess_cfg)
    transform = image_transform_v2(PreprocessCfg(**preprocess_cfg), is_train=False)
    return Encoder(model, MedicalPreprocess(transform, window), build_tokenizer(model_cfg), model_cfg,
                   preprocess_cfg, name=name, precision=precision, heads=heads, text_tower_name=text_tower_name)


def hub_tower_name(model_cfg: dict) -> str | None:
    """The HF text tower's hub id when the config names one (not a local directory), else None."""
    name = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if not name or name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") != 1:
        return None
    return name


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

class RandomWeightsWarning(UserWarning):
    """An architecture was built without any checkpoint: its weights are random."""


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _caller_stacklevel() -> int:
    """``warnings.warn`` stacklevel of the first frame outside medclip: the user's own line, whether
    they called ``load`` or ``create_model_and_transforms`` (``skip_file_prefixes`` needs Python 3.12)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def load(
    name_or_path: str | Path,
    device=None,
    precision: str | None = None,
    checkpoint: str | Path | None = None,
    allow_mismatch: bool = False,
    hf_text_dir: str | Path | None = None,
    window: Window | None = None,
) -> Encoder:
    """Load an image-text encoder: a named pretrained model, an architecture, an export or a checkpoint.

    Args:
        name_or_path: one of
            * a named pretrained model (``medclip.list_pretrained()``: ``biomedclip``,
              ``unimed-clip-b16``, ``unimed-clip-l14-336``, ``unimed-clip-l14-336-large-text``,
              ``pmc-clip``, ``conceptclip``, ``medsiglip-448``): fetched from the Hugging Face hub,
              or read from ``checkpoint`` offline;
            * a registered architecture (``medclip.list_models()``, or any open_clip config name):
              random weights (with a :class:`RandomWeightsWarning`) unless ``checkpoint`` is given;
            * a directory in open_clip's hub format (``open_clip_config.json`` + weights), also as
              ``local-dir:DIR``; ``hf-hub:org/name`` for one on the hub;
            * a medclip training checkpoint (``.pt`` carrying ``model_cfg``).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when available.
        precision: ``fp32`` (default), ``fp16``/``bf16`` (weights cast), ``pure_fp16``/``pure_bf16``,
            ``amp``/``amp_bf16`` (fp32 weights, autocast while encoding).
        checkpoint: weights for a named model (the downloaded file or snapshot directory, in the
            format it is published in) or for an architecture (an open_clip / UniMed-CLIP state dict,
            ``{"state_dict": ...}``, DDP ``module.`` and ``torch.compile`` prefixes accepted).
        allow_mismatch: load a checkpoint with missing or unexpected keys (logged) instead of failing.
        hf_text_dir: a local directory with the HF text tower's ``config.json`` and tokenizer files,
            for offline use (e.g. a downloaded BiomedBERT).
        window: default intensity window (``medclip.imaging.Window``) for 16-bit and DICOM images.

    Returns:
        An :class:`~medclip.Encoder` (``encode_image``, ``encode_text``, ``patch_embeddings``,
        ``preprocess``, ``tokenizer``, ``model`` = the plain open_clip module).

    Raises:
        MedclipError: one line naming what was wrong (unknown name, missing file, a checkpoint of
        another family, mismatched keys or shapes).
    """
    device = _default_device(device)
    precision = precision or "fp32"
    ref = str(name_or_path)
    entry = pretrained.get(ref)
    if entry is not None:
        return _load_pretrained(entry, checkpoint, device, precision, allow_mismatch, hf_text_dir, window)
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
    tower_name = hub_tower_name(resolve_config(ref))
    model = build_model(model_cfg, device, precision)
    heads = None
    if checkpoint is None:
        warnings.warn(f"{ref}: no checkpoint given, the model has random weights (pass checkpoint=PATH, or "
                      f"load a named pretrained model: medclip.list_pretrained())", RandomWeightsWarning,
                      stacklevel=_caller_stacklevel())
    else:
        obj = read_weights_file(checkpoint)
        load_weights(model, extract_state_dict(obj), allow_mismatch, source=str(checkpoint))
        if isinstance(obj, dict) and isinstance(obj.get("heads"), dict) and "heads_config" in obj:
            heads = build_heads(obj["heads_config"], obj["heads"], device)
    return _encoder(model, model_cfg, build_preprocess_cfg(model), ref, precision, window, heads, tower_name)


def load_spec(spec: str | Path, **kwargs) -> Encoder:
    """``NAME=PATH`` (a named pretrained model with its downloaded checkpoint, as the command line
    takes it) or anything :func:`load` takes; ``kwargs`` go to :func:`load`."""
    name, sep, path = str(spec).partition("=")
    if sep and pretrained.get(name) is not None:
        return load(name, checkpoint=path, **kwargs)
    return load(spec, **kwargs)


def spec_name(spec: str | Path) -> str:
    """The display name of a model spec: NAME for ``NAME=PATH``, else the spec itself."""
    name, sep, _ = str(spec).partition("=")
    return name if sep and pretrained.get(name) is not None else str(spec)


def _load_pretrained(entry, checkpoint, device, precision, allow_mismatch, hf_text_dir, window) -> Encoder:
    family = families.get(entry.family)
    source = Path(checkpoint) if checkpoint is not None else pretrained.download(entry)
    if not source.exists():
        raise MedclipError(f"{entry.name}: checkpoint not found: {source}")
    converted = family.read(source, entry, hf_text_dir)
    model = build_model(converted.model_cfg, device, precision)
    context = f"{entry.name} ({family.TITLE})"
    load_weights(model, converted.state_dict, allow_mismatch, source=str(source), context=context)
    heads = None
    if converted.heads_config is not None:
        heads = build_heads(converted.heads_config, converted.heads_state, device)
    return _encoder(model, converted.model_cfg, build_preprocess_cfg(model, converted.preprocess_cfg), entry.name,
                    precision, window, heads, converted.text_tower_name)


def encoder_from_state(model_cfg: dict, state_dict: dict, heads_config: dict | None = None,
                       heads_state: dict | None = None, device="cpu", name: str = "",
                       preprocess_cfg: dict | None = None) -> Encoder:
    """An Encoder from in-memory weights (the trainer's snapshot for evaluation and export)."""
    model = build_model(model_cfg, device, "fp32")
    load_weights(model, state_dict, source=name or "state dict")
    heads = build_heads(heads_config, heads_state, device) if heads_config is not None else None
    return _encoder(model, model_cfg, build_preprocess_cfg(model, preprocess_cfg), name, "fp32", None, heads,
                    hub_tower_name(model_cfg))


def _download_hub(model_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id))
    except Exception as exc:
        raise MedclipError(f"cannot fetch hf-hub:{model_id}: {str(exc).splitlines()[0]}") from exc


def _not_open_clip_dir(directory: Path) -> MedclipError:
    hint = ""
    if (directory / "config.json").is_file() and (directory / "preprocessor_config.json").is_file():
        hint = " (a transformers snapshot: for MedSigLIP use medclip.load('medsiglip-448', checkpoint=DIR))"
    return MedclipError(f"{directory} is not a model directory: {HUB_CONFIG} is missing{hint}")


def _load_hub_dir(directory: Path, name, device, precision, allow_mismatch, hf_text_dir, window) -> Encoder:
    config_path = directory / HUB_CONFIG
    if not config_path.is_file():
        raise _not_open_clip_dir(directory)
    hub_cfg = export.read_hub_config(directory)
    model_cfg = hub_cfg["model_cfg"]
    tower_name = hub_tower_name(model_cfg)
    model_cfg = with_text_dir(export.resolve_bundled(model_cfg, directory), hf_text_dir)
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
    return _encoder(model, model_cfg, preprocess_cfg, str(name), precision, window, heads, tower_name)


def _load_training_checkpoint(path: Path, device, precision, allow_mismatch, hf_text_dir, window) -> Encoder:
    obj = read_weights_file(path)
    model_cfg = obj.get("model_cfg") if isinstance(obj, dict) else None
    if not isinstance(model_cfg, dict):
        raise _no_model_config(path, obj)
    tower_name = hub_tower_name(model_cfg)
    model_cfg = with_text_dir(model_cfg, hf_text_dir)
    model = build_model(model_cfg, device, precision)
    load_weights(model, merged_adapters(obj, model_cfg), allow_mismatch, source=str(path))
    heads = None
    if isinstance(obj.get("heads"), dict) and isinstance(obj.get("heads_config"), dict):
        heads = build_heads(obj["heads_config"], obj["heads"], device)
    return _encoder(model, model_cfg, build_preprocess_cfg(model, obj.get("preprocess_cfg")), str(path),
                    precision, window, heads, tower_name)


def merged_adapters(obj: dict, model_cfg: dict) -> dict:
    """A training checkpoint's model weights; a LoRA run's (``model.lora`` in its recipe) keep the adapters
    unmerged for resume, and are merged here as the run's export merges them."""
    state = extract_state_dict(obj)
    lora = ((obj.get("recipe") or {}).get("model") or {}).get("lora") or {}
    if not lora.get("rank"):
        return state
    from medclip.training.config import LoraConfig
    from medclip.training.lora import merged_for_export

    return merged_for_export(model_cfg, state, LoraConfig(**lora))


def _no_model_config(path: Path, obj) -> MedclipError:
    """A state dict without a config: say which family it looks like and how to load it."""
    try:
        found = families.identify(strip_wrappers(extract_state_dict(obj)))
    except MedclipError:
        found = None
    entries = [e.name for e in pretrained.ENTRIES.values() if found and families.get(e.family).TITLE == found]
    if entries:
        return MedclipError(f"{path} looks like a {found} checkpoint and carries no model config: "
                            f"load it as medclip.load({entries[0]!r}, checkpoint='{path}')")
    return MedclipError(
        f"{path} carries no model config (a plain open_clip or UniMed-CLIP state dict): "
        f"name its architecture, e.g. medclip.load('medclip-vit-b16-biomedbert', checkpoint='{path}')"
    )


save = export.save
