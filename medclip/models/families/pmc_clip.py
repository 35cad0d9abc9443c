"""PMC-CLIP (WeixiongLin/PMC-CLIP): its own code, mapped onto open_clip's ModifiedResNet + HF tower.

Read from its code (``pmc_clip/model``): the image tower is OpenAI CLIP's ModifiedResNet (3-conv stem,
anti-aliased bottlenecks, QKV attention pool) - open_clip's ``ModifiedResNet`` with the same module
names; the text feature is PubMedBERT's last hidden state at the [CLS] position times the matrix
``text_projection``, and BERT is called **without an attention mask** (padding tokens take part
in attention). open_clip's HF tower masks ``ids == config.pad_token_id``, so the converted tower's
config gets one extra all-zero embedding row and names it as padding: the tokenizer never produces
that id, nothing is masked, exactly as in PMC-CLIP. Its MLM fusion module, ``img_special_token``,
``mlm_projection``, ``positional_embedding``, ``ln_final`` and BERT's pooler do not enter image or
text features and are dropped. Checkpoint: ``{"epoch", "name", "state_dict", "optimizer"}`` from its
DDP training (``module.`` prefix). Tokenizer: PubMedBERT's, padded to 77. Preprocessing: bicubic
resize + centre crop 224, OpenAI mean/std.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from medclip.models.families import bert
from medclip.models.families.base import (
    OPENAI_MEAN,
    OPENAI_STD,
    Converted,
    count_indexed,
    find_file,
    load_state,
)

log = logging.getLogger(__name__)

TITLE = "PMC-CLIP"
REQUIRED = ("visual.attnpool.c_proj.weight", "visual.layer1.0.conv1.weight", "text_projection",
            "text_encoder.embeddings.word_embeddings.weight", "logit_scale")
# Parts of PMC-CLIP's training model that image and text features never use.
UNUSED = ("img_special_token", "positional_embedding", "ln_final.", "fusion_module.", "mlm_projection")
RESNET_HEAD_WIDTH = 64
CONTEXT_LENGTH = 77


def claims(keys) -> bool:
    return "text_projection" in keys and "visual.attnpool.c_proj.weight" in keys and \
        any(k.startswith("text_encoder.") for k in keys)


def resnet_cfg(state: dict) -> dict:
    grid = math.isqrt(state["visual.attnpool.positional_embedding"].shape[0] - 1)
    return {"layers": [count_indexed(state, f"visual.layer{i}.") for i in range(1, 5)],
            "width": int(state["visual.layer1.0.conv1.weight"].shape[0]), "head_width": RESNET_HEAD_WIDTH,
            "image_size": 32 * grid}


def unmasked_padding(config: dict) -> dict:
    """One extra vocabulary row named as padding: no real token id is ever masked."""
    config["pad_token_id"] = config["vocab_size"]
    config["vocab_size"] += 1
    return config


def read(source: Path, entry, hf_text_dir=None) -> Converted:
    path = find_file(source, (entry.filename,) if entry.filename else (), entry.name, "PMC-CLIP checkpoint", ("*.pt",))
    state = load_state(path)
    from medclip.models.families import require

    require(state, REQUIRED, entry, TITLE, path)
    dropped = sorted(k for k in state if k.startswith(UNUSED))
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED)}
    tower = bert.resolve(state, "text_encoder.", entry.settings["text_hub_id"], hf_text_dir, beside=path.parent,
                         edit=unmasked_padding)
    state = bert.rename(state, "text_encoder.", "text.transformer.", drop=("pooler.",))
    emb = state["text.transformer.embeddings.word_embeddings.weight"]
    state["text.transformer.embeddings.word_embeddings.weight"] = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])
    state["text.proj.weight"] = state.pop("text_projection").t().contiguous()
    model_cfg = {
        "embed_dim": int(state["visual.attnpool.c_proj.weight"].shape[0]), "vision_cfg": resnet_cfg(state),
        "text_cfg": bert.text_cfg(tower, "linear", "cls_last_hidden_state_pooler", CONTEXT_LENGTH),
    }
    log.info("%s: dropped %d training-only keys (%s)", entry.name, len(dropped), ", ".join(sorted(
        {k.split(".")[0] for k in dropped})))
    return Converted(model_cfg=model_cfg, state_dict=state, text_tower_name=None,
                     preprocess_cfg={"mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic",
                                     "resize_mode": "shortest"})
