"""UniMed-CLIP (mbzuai-oryx/UniMed-CLIP): a forked open_clip's ``.pt`` with a BiomedBERT tower.

Read from the fork's code: the image tower is open_clip's native ViT with QuickGELU (class token,
``ln_pre``, ``ln_post`` on the class token, ``proj``); the text tower ``text_encoder`` is HF's BertModel
without its pooler, called with the mask ``ids != pad``, the last hidden state's CLS token through
``Linear(d, (d+E)//2) -> GELU -> Linear(.., E)`` (no biases) - open_clip's HF tower with
``hf_proj_type: mlp`` and ``cls_last_hidden_state_pooler`` under the name ``text``. The checkpoint is
``{"state_dict": ...}`` (plus epoch, name, optimizer) or a bare state dict, keys maybe ``module.``-prefixed.
Tokenizer: BiomedBERT's, padded to 256. Preprocessing: bicubic resize + centre crop, OpenAI mean/std.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from medclip.models.families import bert
from medclip.models.families.base import (
    OPENAI_MEAN,
    OPENAI_STD,
    Converted,
    count_indexed,
    find_file,
    load_state,
    mlp_ratio,
)

log = logging.getLogger(__name__)

TITLE = "UniMed-CLIP"
REQUIRED = ("visual.conv1.weight", "visual.proj", "text_encoder.transformer.embeddings.word_embeddings.weight",
            "text_encoder.proj.0.weight", "text_encoder.proj.2.weight", "logit_scale")
VIT_HEAD_WIDTH = 64
CONTEXT_LENGTH = 256


def claims(keys) -> bool:
    return any(k.startswith("text_encoder.transformer.") for k in keys) and "visual.conv1.weight" in keys


def vit_cfg(state: dict, prefix: str = "visual.") -> dict:
    """open_clip native ViT settings from its tensors (as open_clip does for OpenAI checkpoints)."""
    conv = state[prefix + "conv1.weight"]
    grid = math.isqrt(state[prefix + "positional_embedding"].shape[0] - 1)
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    return {"image_size": patch * grid, "layers": count_indexed(state, prefix + "transformer.resblocks."),
            "width": width, "head_width": VIT_HEAD_WIDTH, "patch_size": patch,
            "mlp_ratio": mlp_ratio(int(state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), width)}


def read(source: Path, entry, hf_text_dir=None) -> Converted:
    path = find_file(source, (entry.filename,) if entry.filename else (), entry.name, "UniMed-CLIP .pt file", ("*.pt",))
    state = load_state(path)
    from medclip.models.families import require

    require(state, REQUIRED, entry, TITLE, path)
    vision = vit_cfg(state)
    published = entry.settings.get("vision", {})
    if any(vision.get(k) != v for k, v in published.items()):
        log.warning("%s: the checkpoint's image tower (%s) differs from the published %s; loading it as found",
                    entry.name, {k: vision[k] for k in published}, published)
    tower = bert.resolve(state, "text_encoder.transformer.", entry.settings["text_hub_id"], hf_text_dir,
                         beside=path.parent)
    model_cfg = {
        "embed_dim": int(state["visual.proj"].shape[1]), "quick_gelu": True, "vision_cfg": vision,
        "text_cfg": bert.text_cfg(tower, "mlp", "cls_last_hidden_state_pooler", CONTEXT_LENGTH),
    }
    return Converted(model_cfg=model_cfg, state_dict=bert.rename(state, "text_encoder.", "text."),
                     preprocess_cfg={"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
                                     "resize_mode": "shortest"},
                     text_tower_name=tower.portable_name)
