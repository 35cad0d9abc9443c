"""The rehearsal's debug model: a tiny model of the same family as a recipe's model.

Made from the recipe's model config and the debug sizes and flavours declared below (as torchtitan
declares its "debug model" flavours), not searched for: every key that says what KIND of model it is
(tower types, pooling, projections, activations, logit bias, context length) is copied; only the
keys that say how BIG it is are replaced by the declared debug sizes.

* native open_clip towers (ViT, ModifiedResNet, text transformer): fewer, narrower layers;
* a timm image tower: the debug flavour declared for its family in ``TIMM_DEBUG_FLAVOURS`` (one
  of timm's own test architectures with the family's class, pooling and class token, e.g.
  ``test_vit3`` is a ViT with an attention-pool (MAP) head and no class token, like SigLIP), with
  the recipe's ``timm_pool``/``timm_proj``; the family is read from the recipe's trunk built on the
  meta device (no memory, no weights);
* a HuggingFace text tower: medclip's offline tiny BERT (``medclip/assets/tiny-bert``) with the
  recipe's pooler, projection and context length.

The result is an ordinary open_clip config; the rehearsal writes it as ``open_clip_config.json``
in a directory and names the model ``local-dir:DIR``, which open_clip (and so medclip) resolves.
"""

from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from medclip import jsonio
from medclip.errors import MedclipError

DEBUG_WIDTH = 64  # native towers: width of the debug transformer / ResNet stem
DEBUG_LAYERS = 2
DEBUG_HEAD_WIDTH = 32
DEBUG_IMAGE_SIZE = 64
DEBUG_PATCH_SIZE = 8
DEBUG_EMBED_DIM = 64
DEBUG_CONTEXT = 64  # text tokens: attention and the text tower's cost grow with it
TINY_BERT = "tiny-bert"  # under medclip/assets: WordPiece vocabulary + config, random weights


@dataclass
class DebugModel:
    """The derived config and a line per tower saying what was kept and what was swapped."""

    config: dict
    notes: list[str] = field(default_factory=list)

    def write(self, directory: Path) -> str:
        """Write ``open_clip_config.json`` into ``directory``; returns the model name to put in a recipe."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "open_clip_config.json").write_text(jsonio.dumps({"model_cfg": self.config}, indent=2))
        return f"local-dir:{directory.resolve()}"

    def write_start_weights(self, directory: Path, seed: int) -> Path:
        """Random weights of the debug model as a weights file: the stand-in for a recipe's model.checkpoint
        (a fine-tuning recipe starts from one)."""
        import torch
        from safetensors.torch import save_file

        from medclip.models.loading import build_model

        torch.manual_seed(seed)
        state = {k: v.contiguous().clone() for k, v in build_model(self.config, "cpu").state_dict().items()}
        path = directory / "start.safetensors"
        save_file(state, str(path))
        return path.resolve()


def _shrink(value, debug):
    """The smaller of the recipe's size and the debug size (an already tiny model stays as small)."""
    return min(value, debug) if isinstance(value, int) else debug


# ----------------------------------------------------------------------------- image towers

def _native_vision(cfg: dict, notes: list[str]) -> dict:
    out = dict(cfg)
    layers = cfg.get("layers", 12)
    if isinstance(layers, (list, tuple)):  # open_clip ModifiedResNet: one entry per stage
        out["layers"] = [1] * len(layers)
        out["width"] = _shrink(cfg.get("width", 64), 16)
        kind = f"ModifiedResNet {len(layers)} stages"
    else:
        out["layers"] = _shrink(layers, DEBUG_LAYERS)
        out["width"] = _shrink(cfg.get("width", 768), DEBUG_WIDTH)
        out["head_width"] = _shrink(cfg.get("head_width", 64), DEBUG_HEAD_WIDTH)
        out["patch_size"] = _shrink(cfg.get("patch_size", 16), DEBUG_PATCH_SIZE)
        kind = "ViT"
    out["image_size"] = _shrink(cfg.get("image_size", 224), DEBUG_IMAGE_SIZE)
    kept = sorted(k for k in cfg if k not in ("layers", "width", "head_width", "patch_size", "image_size"))
    notes.append(f"image tower: open_clip {kind}, {_describe(cfg)} -> {_describe(out)}"
                 + (f"; kept {', '.join(f'{k}={cfg[k]}' for k in kept)}" if kept else ""))
    return out


def _describe(cfg: dict) -> str:
    return "/".join(f"{k} {cfg[k]}" for k in ("layers", "width", "patch_size", "image_size") if k in cfg)


@dataclass(frozen=True)
class TimmDebugFlavour:
    architecture: str  # one of timm's tiny test architectures
    image_size: int  # the input side it is fixed to; 0: any (the debug image size is used)
    width: int  # its feature width: what a 'none' projection passes on to the joint space


# The debug flavour of each timm image-tower family, declared once: (timm class, global pooling) -> flavour;
# pooling "*" covers the class's every pooling. A family without a line here cannot be rehearsed (add one:
# test_rehearsal_parts checks each line against timm).
TIMM_DEBUG_FLAVOURS = {
    ("VisionTransformer", "map"): TimmDebugFlavour("test_vit3", 160, 96),  # SigLIP: MAP head, no class token
    ("VisionTransformer", "token"): TimmDebugFlavour("test_vit", 0, 64),  # class token (CLIP, DINOv2)
    ("VisionTransformer", "avg"): TimmDebugFlavour("test_vit2", 0, 64),  # mean of the patch tokens
    ("VisionTransformerRelPos", "*"): TimmDebugFlavour("test_vit_relpos", 160, 96),
    ("ResNet", "*"): TimmDebugFlavour("test_resnet", 0, 96),
    ("ConvNeXt", "*"): TimmDebugFlavour("test_convnext", 0, 64),
    ("EfficientNet", "*"): TimmDebugFlavour("test_efficientnet", 0, 256),
    ("ByobNet", "*"): TimmDebugFlavour("test_byobnet", 0, 256),
    ("MaxxVit", "*"): TimmDebugFlavour("test_coatnet", 0, 128),
    ("NormFreeNet", "*"): TimmDebugFlavour("test_nfnet", 0, 192),
    ("MambaOut", "*"): TimmDebugFlavour("test_mambaout", 0, 64),
}


def trunk_family(model) -> tuple[str, str]:
    """(timm class, global pooling) of a timm trunk: the key of its debug flavour."""
    pool = getattr(model, "global_pool", None)
    pool = getattr(pool, "pool_type", pool)  # CNNs hold a pooling module, ViTs a string
    return type(model).__name__, str(pool)


def _meta_trunk(name: str):
    import timm
    import torch

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False)


@functools.cache
def debug_timm_trunk(name: str) -> tuple[TimmDebugFlavour, tuple[str, str]]:
    """The declared debug flavour for timm architecture ``name``, and ``name``'s family."""
    import timm

    if not timm.is_model(name):
        raise MedclipError(f"timm has no architecture {name!r} (model config vision_cfg.timm_model_name)")
    cls, pool = trunk_family(_meta_trunk(name))
    flavour = TIMM_DEBUG_FLAVOURS.get((cls, pool)) or TIMM_DEBUG_FLAVOURS.get((cls, "*"))
    if flavour is None:
        raise MedclipError(f"no debug flavour declared for timm {cls} trunks with {pool} pooling (of {name!r}); "
                           f"rehearse with a model config whose image tower has one (rehearsal/model.py "
                           f"TIMM_DEBUG_FLAVOURS)")
    return flavour, (cls, pool)


def _timm_vision(cfg: dict, notes: list[str]) -> tuple[dict, int]:
    """Debug timm tower config and its feature width (what a 'none' projection passes on)."""
    name = cfg["timm_model_name"]
    flavour, (cls, pool) = debug_timm_trunk(name)
    out = dict(cfg, timm_model_name=flavour.architecture, timm_model_pretrained=False)
    out["image_size"] = flavour.image_size or _shrink(cfg.get("image_size", 224), DEBUG_IMAGE_SIZE)
    notes.append(f"image tower: timm {name} -> {flavour.architecture} (the debug flavour of {cls} with {pool} "
                 f"pooling), image {cfg.get('image_size')} -> {out['image_size']} px; "
                 f"kept timm_pool={cfg.get('timm_pool', 'avg')}, timm_proj={cfg.get('timm_proj', 'linear')}")
    return out, flavour.width


# ----------------------------------------------------------------------------- text towers

def _native_text(cfg: dict, notes: list[str]) -> dict:
    out = dict(cfg)
    out["layers"] = _shrink(cfg.get("layers", 12), DEBUG_LAYERS)
    out["width"] = _shrink(cfg.get("width", 512), DEBUG_WIDTH)
    out["heads"] = max(1, out["width"] // DEBUG_HEAD_WIDTH)
    out["context_length"] = _shrink(cfg.get("context_length", 77), DEBUG_CONTEXT)
    kept = sorted(k for k in cfg if k not in ("layers", "width", "heads", "context_length"))
    notes.append(f"text tower: open_clip transformer, layers {cfg.get('layers')} width {cfg.get('width')} context "
                 f"{cfg.get('context_length', 77)} -> layers {out['layers']} width {out['width']} context "
                 f"{out['context_length']}; kept {', '.join(f'{k}={cfg[k]}' for k in kept)}")
    return out


def _hf_text(cfg: dict, notes: list[str]) -> tuple[dict, int]:
    from medclip.models.registry import ASSETS_DIR

    tiny = ASSETS_DIR / TINY_BERT
    hidden = json.loads((tiny / "config.json").read_text())
    out = dict(cfg, hf_model_name=str(tiny), hf_tokenizer_name=str(tiny))
    out.pop("hf_model_pretrained", None)
    out["context_length"] = _shrink(cfg.get("context_length", 77), DEBUG_CONTEXT)
    notes.append(f"text tower: HF {cfg.get('hf_model_name')} -> tiny BERT ({hidden['num_hidden_layers']} layers, "
                 f"width {hidden['hidden_size']}, offline vocabulary), context {cfg.get('context_length', 77)} -> "
                 f"{out['context_length']}; kept hf_pooler_type={cfg.get('hf_pooler_type')}, "
                 f"hf_proj_type={cfg.get('hf_proj_type')}")
    return out, int(hidden["hidden_size"])


# ----------------------------------------------------------------------------- the model

def derive_debug_model(model_cfg: dict) -> DebugModel:
    """A tiny model config of the same family as ``model_cfg`` (see the module doc)."""
    cfg = copy.deepcopy(model_cfg)
    notes: list[str] = []
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    unprojected = []  # widths that reach the joint space without a projection: embed_dim must equal them
    if vision.get("timm_model_name"):
        cfg["vision_cfg"], width = _timm_vision(vision, notes)
        if vision.get("timm_proj", "linear") in ("none", "", None) and vision.get("timm_pool") not in (
                "abs_attn", "rot_attn"):
            unprojected.append(width)
    else:
        cfg["vision_cfg"] = _native_vision(vision, notes)
    if text.get("hf_model_name"):
        cfg["text_cfg"], width = _hf_text(text, notes)
        if text.get("hf_proj_type") in ("none", "", None):
            unprojected.append(width)
    else:
        cfg["text_cfg"] = _native_text(text, notes)
    if len(set(unprojected)) > 1:
        raise MedclipError(f"cannot derive a debug model: both towers skip their projection but have widths "
                           f"{unprojected}")
    cfg["embed_dim"] = unprojected[0] if unprojected else _shrink(model_cfg.get("embed_dim", 512), DEBUG_EMBED_DIM)
    kept = sorted(k for k in cfg if k not in ("vision_cfg", "text_cfg", "embed_dim"))
    notes.append(f"joint space: embed_dim {model_cfg.get('embed_dim')} -> {cfg['embed_dim']}"
                 + (f"; kept {', '.join(f'{k}={cfg[k]}' for k in kept)}" if kept else ""))
    return DebugModel(cfg, notes)
