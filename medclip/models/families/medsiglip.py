"""MedSigLIP (google/medsiglip-448): a transformers ``SiglipModel`` snapshot, mapped onto open_clip.

open_clip has no importer for HF SigLIP weights; this is one. The vision tower becomes timm's SigLIP
ViT (what open_clip's own SigLIP configs use): patch embedding with bias, no class token, learned
positions, pre-norm blocks (q/k/v fused into ``qkv``), final norm, and the attention-pool head
(``head.probe`` -> ``attn_pool.latent``, ``in_proj`` split into ``q`` and ``kv``), GELU-tanh as in the HF
config, at the snapshot's image size (448 px has no timm registry name, so a timm config directory
carries the sizes). The text tower becomes open_clip's native text transformer: no causal mask, the
last position pooled after the final norm, a linear head with bias. Google's serving code feeds
``input_ids`` only (padded to 64, no attention mask), and so does open_clip. Preprocessing comes from
the snapshot's ``preprocessor_config.json`` (squash resize, its resample filter, mean/std), the
tokenizer from its SentencePiece files (``pip install sentencepiece``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medclip.models import tower_dirs
from medclip.models.families.base import Converted, FamilyError, find_file, load_state, mlp_ratio

TITLE = "MedSigLIP (HF SigLIP)"
TIMM_ARCH = "vit_so400m_patch14_siglip_384"
WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
REQUIRED = ("vision_model.embeddings.patch_embedding.weight", "vision_model.head.probe",
            "text_model.embeddings.token_embedding.weight", "text_model.head.weight", "logit_scale", "logit_bias")
PIL_FILTERS = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def claims(keys) -> bool:
    return any(k.startswith("vision_model.embeddings.") for k in keys)


def _weights(source: Path, entry) -> dict:
    path = find_file(source, WEIGHTS, entry.name, "weights (model.safetensors)")
    if path.name.endswith(".index.json"):  # sharded snapshot
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_state(find_file(source, (shard,), entry.name, f"weights shard {shard}")))
        return state
    return load_state(path)


def _vision(state: dict, cfg) -> tuple[dict, dict]:
    """timm SigLIP ViT args and its state dict (``visual.trunk.`` keys) from HF's vision model."""
    width = cfg.hidden_size
    args = {"img_size": cfg.image_size, "patch_size": cfg.patch_size, "embed_dim": width,
            "depth": cfg.num_hidden_layers, "num_heads": cfg.num_attention_heads,
            "mlp_ratio": mlp_ratio(cfg.intermediate_size, width), "act_layer": "gelu_tanh"}
    hf, out = "vision_model.", {}
    out["patch_embed.proj.weight"] = state[hf + "embeddings.patch_embedding.weight"]
    out["patch_embed.proj.bias"] = state[hf + "embeddings.patch_embedding.bias"]
    out["pos_embed"] = state[hf + "embeddings.position_embedding.weight"][None]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{hf}encoder.layers.{i}.", f"blocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"norm1.{part}"] = state[src + f"layer_norm1.{part}"]
            out[dst + f"norm2.{part}"] = state[src + f"layer_norm2.{part}"]
            out[dst + f"attn.qkv.{part}"] = torch.cat([state[src + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[dst + f"attn.proj.{part}"] = state[src + f"self_attn.out_proj.{part}"]
            out[dst + f"mlp.fc1.{part}"] = state[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.fc2.{part}"] = state[src + f"mlp.fc2.{part}"]
    head = hf + "head."
    out["attn_pool.latent"] = state[head + "probe"]
    in_w, in_b = state[head + "attention.in_proj_weight"], state[head + "attention.in_proj_bias"]
    out["attn_pool.q.weight"], out["attn_pool.kv.weight"] = in_w[:width], in_w[width:]
    out["attn_pool.q.bias"], out["attn_pool.kv.bias"] = in_b[:width], in_b[width:]
    for part in ("weight", "bias"):
        out[f"attn_pool.proj.{part}"] = state[head + f"attention.out_proj.{part}"]
        out[f"attn_pool.norm.{part}"] = state[head + f"layernorm.{part}"]
        out[f"attn_pool.mlp.fc1.{part}"] = state[head + f"mlp.fc1.{part}"]
        out[f"attn_pool.mlp.fc2.{part}"] = state[head + f"mlp.fc2.{part}"]
        out[f"norm.{part}"] = state[hf + f"post_layernorm.{part}"]
    return args, {"visual.trunk." + k: v for k, v in out.items()}


def _text(state: dict, cfg) -> tuple[dict, dict]:
    """open_clip native text settings and state dict (``text.`` keys) from HF's text model."""
    width = cfg.hidden_size
    text_cfg = {"context_length": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size, "width": width,
                "heads": cfg.num_attention_heads, "layers": cfg.num_hidden_layers,
                "mlp_ratio": mlp_ratio(cfg.intermediate_size, width), "no_causal_mask": True, "proj_bias": True,
                "pool_type": "last", "norm_kwargs": {"eps": cfg.layer_norm_eps}, "act_kwargs": {"approximate": "tanh"}}
    hf, out = "text_model.", {}
    out["token_embedding.weight"] = state[hf + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = state[hf + "embeddings.position_embedding.weight"]
    for i in range(cfg.num_hidden_layers):
        src, dst = f"{hf}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[dst + f"ln_1.{part}"] = state[src + f"layer_norm1.{part}"]
            out[dst + f"ln_2.{part}"] = state[src + f"layer_norm2.{part}"]
            out[dst + f"mlp.c_fc.{part}"] = state[src + f"mlp.fc1.{part}"]
            out[dst + f"mlp.c_proj.{part}"] = state[src + f"mlp.fc2.{part}"]
            out[dst + f"attn.out_proj.{part}"] = state[src + f"self_attn.out_proj.{part}"]
        out[dst + "attn.in_proj_weight"] = torch.cat([state[src + f"self_attn.{p}_proj.weight"] for p in "qkv"])
        out[dst + "attn.in_proj_bias"] = torch.cat([state[src + f"self_attn.{p}_proj.bias"] for p in "qkv"])
    for part in ("weight", "bias"):
        out[f"ln_final.{part}"] = state[hf + f"final_layer_norm.{part}"]
        out[f"text_projection.{part}"] = state[hf + f"head.{part}"]
    return text_cfg, {"text." + k: v for k, v in out.items()}


def _preprocess(source: Path) -> dict:
    path = source / "preprocessor_config.json"
    if not path.is_file():
        raise FamilyError(f"medsiglip: {source} has no preprocessor_config.json")
    cfg = json.loads(path.read_text())
    normalize = cfg.get("do_normalize", True)
    return {"mean": tuple(cfg.get("image_mean", (0.5,) * 3)) if normalize else (0.0,) * 3,
            "std": tuple(cfg.get("image_std", (0.5,) * 3)) if normalize else (1.0,) * 3,
            "interpolation": PIL_FILTERS.get(int(cfg.get("resample", 2)), "bilinear"), "resize_mode": "squash"}


def read(source: Path, entry, hf_text_dir=None) -> Converted:
    from transformers import SiglipConfig

    if not source.is_dir():
        raise FamilyError(f"{entry.name}: expected the snapshot directory (config.json, model.safetensors, "
                          f"tokenizer and preprocessor files), got {source}")
    find_file(source, ("config.json",), entry.name, "config.json")
    config = SiglipConfig.from_pretrained(str(source))
    state = _weights(source, entry)
    from medclip.models.families import require

    require(state, REQUIRED, entry, TITLE, source)
    if not tower_dirs.has_tokenizer(source):
        raise FamilyError(f"{entry.name}: {source} has no tokenizer files (spiece.model, tokenizer_config.json)")
    args, vision_state = _vision(state, config.vision_config)
    text_cfg, text_state = _text(state, config.text_config)
    if config.text_config.projection_size != config.vision_config.hidden_size:
        raise FamilyError(f"{entry.name}: text projection {config.text_config.projection_size} != image width "
                          f"{config.vision_config.hidden_size}")
    text_cfg["hf_tokenizer_name"] = str(source)
    model_cfg = {
        "embed_dim": config.vision_config.hidden_size, "init_logit_bias": -10.0, "custom_text": True,
        "vision_cfg": {"image_size": args["img_size"], "timm_model_name": tower_dirs.timm_tower_name(TIMM_ARCH, args),
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
        "text_cfg": text_cfg,
    }
    state_dict = {**vision_state, **text_state, "logit_scale": state["logit_scale"], "logit_bias": state["logit_bias"]}
    return Converted(model_cfg=model_cfg, state_dict=state_dict, preprocess_cfg=_preprocess(source))
