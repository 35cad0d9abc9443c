"""ConceptCLIP (JerrryNie/ConceptCLIP): a forked open_clip ``CustomTextCLIP`` with concept heads.

Read from the fork's training code (``pre_training/src/open_clip``): image tower timm
``vit_so400m_patch14_siglip_384`` with ``global_pool='map'`` and no projection; image tokens are
``trunk.forward_features`` (all patches after the final norm). Text tower: PubMedBERT without its
pooler, ``hf_proj_type: linear`` and - its config names no pooler, so the dataclass default -
``mean_pooler``; token states are the full last hidden state. ``logit_bias`` starts at -10.
Concept heads: ``image_proj`` and ``text_proj`` (Linear-GELU-Linear, no biases) on patch and token
states, ``concept_logit_scale`` (used as exp(.)) and ``concept_logit_bias``; a concept's vector is the
mean of ``text_proj`` over its span's tokens. These become medclip's PC-Align heads with
``concept_head_on_tokens``. Checkpoint: ``epoch_N.pt`` = ``{"epoch", "name", "state_dict" (DDP
``module.``), "optimizer"}``. The HF release (gated, ``trust_remote_code``) is read as a snapshot whose
weights use the same names, possibly under one prefix: that is inferred, not confirmed.
Preprocessing: squash-resize to 384, bicubic, mean/std 0.5; tokenizer PubMedBERT's, padded to 77.
"""

from __future__ import annotations

import math
from pathlib import Path

from medclip.models import tower_dirs
from medclip.models.families import bert
from medclip.models.families.base import (
    Converted,
    FamilyError,
    count_indexed,
    find_file,
    load_state,
    mlp_ratio,
)

TITLE = "ConceptCLIP"
TIMM_ARCH = "vit_so400m_patch14_siglip_384"
SO400M_HEAD_WIDTH = 72  # 1152 wide, 16 heads
PUBLISHED_VISION = {"embed_dim": 1152, "depth": 27, "num_heads": 16, "patch_size": 14, "img_size": 384,
                    "mlp_ratio": mlp_ratio(4304, 1152)}
REQUIRED = ("visual.trunk.patch_embed.proj.weight", "text.transformer.embeddings.word_embeddings.weight",
            "text.proj.weight", "logit_scale", "logit_bias")
HEAD_KEYS = {"image_proj.0.weight": "patch_head.0.weight", "image_proj.2.weight": "patch_head.2.weight",
             "text_proj.0.weight": "concept_head.0.weight", "text_proj.2.weight": "concept_head.2.weight",
             "concept_logit_scale": "logit_scale", "concept_logit_bias": "logit_bias"}
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CONTEXT_LENGTH = 77


def claims(keys) -> bool:
    return "concept_logit_scale" in keys or any(k.startswith("image_proj.") for k in keys)


def timm_args(state: dict, prefix: str = "visual.trunk.") -> dict:
    patch = state[prefix + "patch_embed.proj.weight"]
    width = int(patch.shape[0])
    return {"embed_dim": width, "depth": count_indexed(state, prefix + "blocks."),
            "num_heads": width // SO400M_HEAD_WIDTH, "patch_size": int(patch.shape[-1]),
            "img_size": int(patch.shape[-1]) * math.isqrt(state[prefix + "pos_embed"].shape[1]),
            "mlp_ratio": mlp_ratio(int(state[prefix + "blocks.0.mlp.fc1.weight"].shape[0]), width)}


def _strip_release_prefix(state: dict) -> dict:
    """HF release weights: the training names, maybe under one wrapper prefix (inferred)."""
    if "logit_scale" in state:
        return state
    for key in state:
        if key.endswith("logit_scale") and not key.endswith("concept_logit_scale"):
            prefix = key[: -len("logit_scale")]
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def read(source: Path, entry, hf_text_dir=None) -> Converted:
    path = find_file(source, HF_WEIGHTS, entry.name, "weights (model.safetensors / pytorch_model.bin)",
                     ("epoch_latest.pt",) if (source / "epoch_latest.pt").is_file() else ("epoch_*.pt",))
    state = _strip_release_prefix(load_state(path))
    from medclip.models.families import require

    require(state, REQUIRED, entry, TITLE, path)
    args = timm_args(state)
    timm_name = TIMM_ARCH if args == PUBLISHED_VISION else tower_dirs.timm_tower_name(TIMM_ARCH, args)
    tower = bert.resolve(state, "text.transformer.", entry.settings["text_hub_id"], hf_text_dir,
                         beside=path.parent)
    embed_dim = int(state["text.proj.weight"].shape[0])
    model_cfg = {
        "embed_dim": embed_dim, "init_logit_bias": -10.0, "custom_text": True,
        "vision_cfg": {"image_size": args["img_size"], "timm_model_name": timm_name, "timm_model_pretrained": False,
                       "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": bert.text_cfg(tower, "linear", "mean_pooler", CONTEXT_LENGTH),
    }
    heads_state = {new: state.pop(old) for old, new in HEAD_KEYS.items() if old in state}
    heads_config = None
    if heads_state:
        if len(heads_state) != len(HEAD_KEYS):
            raise FamilyError(f"{entry.name}: {path} has only part of ConceptCLIP's concept heads: "
                              f"{', '.join(sorted(heads_state))}")
        hidden = int(heads_state["patch_head.0.weight"].shape[0])
        heads_config = {"image_width": args["embed_dim"], "text_width": int(tower.config["hidden_size"]),
                        "embed_dim": int(heads_state["patch_head.2.weight"].shape[0]), "hidden_dim": hidden,
                        "concept_head_on_tokens": True}
    return Converted(model_cfg=model_cfg, state_dict=bert.rename(state, "text.transformer.", "text.transformer."),
                     preprocess_cfg={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
                                     "resize_mode": "squash"},
                     text_tower_name=tower.portable_name, heads_config=heads_config, heads_state=heads_state or None)
