"""The BERT text towers of BiomedCLIP, UniMed-CLIP, PMC-CLIP and ConceptCLIP (BiomedBERT/PubMedBERT).

A checkpoint of these families carries the tower's weights but not its ``config.json`` (BiomedCLIP
ships the tokenizer, UniMed-CLIP and PMC-CLIP a bare ``.pt``). The config comes, in this order,
from ``hf_text_dir``, from a ``config.json`` beside the weights, or from the weights themselves:
sizes from the tensor shapes, the rest from the published configs of these BERTs (64-wide heads,
GELU, LayerNorm eps 1e-12, [PAD] = 0, absolute positions). The tokenizer comes from
``hf_text_dir``, from tokenizer files beside the weights, or from the hub id (the HF cache offline).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medclip.models import tower_dirs
from medclip.models.families.base import FamilyError, count_indexed

HEAD_WIDTH = 64
# Published configs of the towers (hub config.json): what an export may name by hub id.
PUBLISHED = {
    "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract": {"hidden_size": 768, "num_hidden_layers": 12},
    "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext": {"hidden_size": 768, "num_hidden_layers": 12},
    "microsoft/BiomedNLP-BiomedBERT-large-uncased-abstract": {"hidden_size": 1024, "num_hidden_layers": 24},
}


@dataclass
class TextTower:
    model_name: str  # local directory with config.json (+ tokenizer files when they are local)
    tokenizer_name: str  # that directory, or the hub id
    portable_name: str | None  # hub id when the tower is the published one
    config: dict


def config_from_weights(state: dict[str, torch.Tensor], prefix: str) -> dict:
    """A BertConfig dict from the tower's tensors (``prefix`` = ``text_encoder.`` etc.)."""
    emb = state[prefix + "embeddings.word_embeddings.weight"]
    hidden = int(emb.shape[1])
    return {
        "model_type": "bert", "architectures": ["BertModel"],
        "vocab_size": int(emb.shape[0]), "hidden_size": hidden,
        "num_hidden_layers": count_indexed(state, prefix + "encoder.layer."),
        "num_attention_heads": hidden // HEAD_WIDTH,
        "intermediate_size": int(state[prefix + "encoder.layer.0.intermediate.dense.weight"].shape[0]),
        "max_position_embeddings": int(state[prefix + "embeddings.position_embeddings.weight"].shape[0]),
        "type_vocab_size": int(state[prefix + "embeddings.token_type_embeddings.weight"].shape[0]),
        "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
        "position_embedding_type": "absolute", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    }


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FamilyError(f"cannot read text tower config {path}: {exc}") from exc


def resolve(state: dict, prefix: str, hub_id: str, hf_text_dir=None, beside: Path | None = None,
            edit=None) -> TextTower:
    """The text tower's config and tokenizer source; ``edit(config)`` may change the config
    (PMC-CLIP's unmasked padding), which makes the tower unpublished."""
    local = Path(hf_text_dir) if hf_text_dir is not None else None
    if local is not None and not (local / "config.json").is_file():
        raise FamilyError(f"hf_text_dir {local} has no config.json (expected a HF model directory)")
    if local is not None:
        config = _read_config(local / "config.json")
    elif beside is not None and (beside / "config.json").is_file() and \
            _read_config(beside / "config.json").get("model_type") == "bert":
        config = _read_config(beside / "config.json")
    else:
        config = config_from_weights(state, prefix)
    if edit is not None:
        config = edit(dict(config))
    tokenizer_dir = next((d for d in (local, beside) if d is not None and tower_dirs.has_tokenizer(d)), None)
    directory = tower_dirs.hf_tower_dir(config, tokenizer_dir)
    published = PUBLISHED.get(hub_id, {})
    same = edit is None and all(config.get(k) == v for k, v in published.items()) and bool(published)
    return TextTower(str(directory), str(directory) if tokenizer_dir else hub_id, hub_id if same else None, config)


def text_cfg(tower: TextTower, proj: str, pooler: str, context_length: int) -> dict:
    return {"hf_model_name": tower.model_name, "hf_tokenizer_name": tower.tokenizer_name,
            "hf_proj_type": proj, "hf_pooler_type": pooler, "context_length": context_length}


def rename(state: dict, old: str, new: str, drop: tuple[str, ...] = ()) -> dict:
    """Keys under ``old`` moved under ``new``; keys under ``old + d`` for d in ``drop`` removed."""
    out = {}
    for key, value in state.items():
        if key.startswith(old):
            rest = key[len(old):]
            if rest.endswith("embeddings.position_ids") or any(rest.startswith(d) for d in drop):
                continue  # position_ids: a buffer older transformers saved; newer ones rebuild it
            key = new + rest
        out[key] = value
    return out
