"""BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224): open_clip's hub format.

The snapshot holds ``open_clip_config.json`` (timm ``vit_base_patch16_224`` with a linear head,
BiomedBERT with ``hf_proj_type: mlp`` and ``cls_last_hidden_state_pooler``, context 256),
``open_clip_pytorch_model.bin`` and the tokenizer files, but not BiomedBERT's ``config.json``: open_clip
fetches that from the hub. medclip takes it from ``hf_text_dir`` or derives it from the weights, so
the snapshot alone loads offline. Older snapshots carry BERT's ``position_ids`` buffer, newer
transformers do not; both load.
"""

from __future__ import annotations

import json
from pathlib import Path

from medclip.models.families import bert
from medclip.models.families.base import Converted, FamilyError, find_file, load_state

TITLE = "BiomedCLIP (open_clip hub format)"
CONFIG = "open_clip_config.json"
WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
REQUIRED = ("text.transformer.embeddings.word_embeddings.weight", "text.proj.0.weight", "logit_scale")


def claims(keys) -> bool:
    return any(k.startswith("visual.trunk.") for k in keys) and any(k.startswith("text.transformer.") for k in keys)


def read(source: Path, entry, hf_text_dir=None) -> Converted:
    if not source.is_dir():
        raise FamilyError(f"{entry.name}: expected the snapshot directory ({CONFIG} + weights + tokenizer files), "
                          f"got {source}")
    config_path = find_file(source, (CONFIG,), entry.name, "open_clip config")
    try:
        hub_cfg = json.loads(config_path.read_text())
        model_cfg, preprocess_cfg = hub_cfg["model_cfg"], hub_cfg.get("preprocess_cfg", {})
    except (json.JSONDecodeError, KeyError) as exc:
        raise FamilyError(f"{entry.name}: {config_path} is not an open_clip config: {exc}") from exc
    weights = find_file(source, WEIGHTS, entry.name, "weights")
    state = load_state(weights)
    from medclip.models.families import require

    require(state, REQUIRED, entry, TITLE, weights)
    text_cfg = model_cfg.get("text_cfg", {})
    hub_id = text_cfg.get("hf_model_name") or entry.settings["text_hub_id"]
    tower = bert.resolve(state, "text.transformer.", hub_id, hf_text_dir, beside=source)
    model_cfg = dict(model_cfg, text_cfg=dict(text_cfg, hf_model_name=tower.model_name,
                                              hf_tokenizer_name=tower.tokenizer_name))
    return Converted(model_cfg=model_cfg, state_dict=bert.rename(state, "text.transformer.", "text.transformer."),
                     preprocess_cfg=preprocess_cfg, text_tower_name=tower.portable_name)
