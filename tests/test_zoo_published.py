"""Reference models given random weights and saved exactly as each family publishes them, and the
reference computations the tests compare medclip against. No test functions here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from test_zoo_originals import (  # tests/ is on sys.path under pytest
    OPENAI_MEAN,
    OPENAI_STD,
    PMCCLIP,
    TEXTS,
    ConceptCLIP,
    UniMedCLIP,
    bert_dir,
    clip_eval_transform,
    hf_token_ids,
    randomize,
    save_training_checkpoint,
)

# ----------------------------------------------------------------------------- building the published forms

def publish_unimed(root: Path):
    torch.manual_seed(11)
    ref = randomize(UniMedCLIP(root), 11)
    path = save_training_checkpoint(ref.state_dict(), root / "unimed-clip-vit-b16.pt")
    return ref, path, dict(hf_text_dir=bert_dir(root))


def publish_pmc(root: Path):
    torch.manual_seed(12)
    ref = randomize(PMCCLIP(root), 12)
    return ref, save_training_checkpoint(ref.state_dict(), root / "checkpoint.pt"), dict(hf_text_dir=bert_dir(root))


def publish_conceptclip(root: Path):
    torch.manual_seed(13)
    ref = randomize(ConceptCLIP(root), 13)
    return ref, save_training_checkpoint(ref.state_dict(), root / "epoch_40.pt"), dict(hf_text_dir=bert_dir(root))


def write_timm_dir(root: Path, architecture: str, args: dict) -> Path:
    out = root / f"timm-{architecture}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"architecture": architecture, "model_args": args,
                                                 "pretrained_cfg": {}}))
    return out


BIOMEDCLIP_VISION = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def publish_biomedclip(root: Path):
    """The hub snapshot's form: open_clip_config.json (BiomedBERT by hub id, no BERT config.json),
    open_clip_pytorch_model.bin, tokenizer files. The timm trunk is reduced through a timm config dir."""
    import open_clip
    from transformers import AutoTokenizer

    timm_dir = write_timm_dir(root, "vit_base_patch16_224", BIOMEDCLIP_VISION)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": f"local-dir:{timm_dir}", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 32},
        "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    }
    hub = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    # open_clip's hub loading is the reference; only BERT's config (which open_clip fetches from the
    # hub by name) is given as a local directory.
    ref_cfg = json.loads(json.dumps(model_cfg))
    ref_cfg["text_cfg"]["hf_model_name"] = str(bert_dir(root))
    build_cfg = json.loads(json.dumps(ref_cfg))
    build_cfg["text_cfg"]["hf_model_pretrained"] = False
    torch.manual_seed(14)
    ref = randomize(open_clip.model.CustomTextCLIP(**build_cfg), 14)
    snapshot = root / "biomedclip-snapshot"
    snapshot.mkdir()
    (snapshot / "open_clip_config.json").write_text(json.dumps(hub, indent=4))
    state = ref.state_dict()
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # older transformers saved it
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    AutoTokenizer.from_pretrained(bert_dir(root)).save_pretrained(snapshot)
    reference = root / "biomedclip-reference"
    shutil.copytree(snapshot, reference)
    (reference / "open_clip_config.json").write_text(json.dumps(dict(hub, model_cfg=ref_cfg)))
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{reference}")
    ref_model.tokenizer = open_clip.get_tokenizer(f"local-dir:{reference}")
    ref_model.preprocess = ref_preprocess
    return ref_model.eval(), snapshot, {}


def train_sentencepiece(root: Path) -> Path:
    import sentencepiece as spm

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 3 + ["a photo of a chest x-ray", "pleural effusion and nodule",
                                             "an MRI scan of the knee", "histopathology slide of the colon"]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=50,
                                   model_type="unigram", eos_id=1, unk_id=2, pad_id=-1, bos_id=-1,
                                   user_defined_symbols=[], minloglevel=2)
    return root / "spiece.model"


def publish_medsiglip(root: Path):
    """transformers' SiglipModel at reduced size, saved with save_pretrained (config.json,
    model.safetensors), a SentencePiece SiglipTokenizer and a SiglipImageProcessor."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipTokenizer

    config = SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=72, num_hidden_layers=2, pad_token_id=1,
                         bos_token_id=None, eos_token_id=1,
                         num_attention_heads=2, max_position_embeddings=64, projection_size=48),
        vision_config=dict(hidden_size=48, intermediate_size=104, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14))
    torch.manual_seed(15)
    ref = randomize(SiglipModel(config), 15)
    snapshot = root / "medsiglip-snapshot"
    ref.save_pretrained(snapshot)
    SiglipTokenizer(vocab_file=str(train_sentencepiece(root)), model_max_length=64).save_pretrained(snapshot)
    SiglipImageProcessor(size={"height": 56, "width": 56}, resample=2).save_pretrained(snapshot)
    return ref, snapshot, {}


PUBLISHERS = {"unimed-clip-b16": publish_unimed, "pmc-clip": publish_pmc, "conceptclip": publish_conceptclip,
              "biomedclip": publish_biomedclip, "medsiglip-448": publish_medsiglip}


# ----------------------------------------------------------------------------- reference forward passes

def reference_features(name: str, ref, root: Path, images, texts):
    """(image features, text features, pixel tensor, token ids) computed the family's own way."""
    with torch.no_grad():
        if name == "medsiglip-448":
            from transformers import AutoImageProcessor, SiglipTokenizer

            snapshot = Path(root)
            pixels = AutoImageProcessor.from_pretrained(snapshot, use_fast=False)(images, return_tensors="pt").pixel_values
            ids = SiglipTokenizer.from_pretrained(snapshot)(texts, padding="max_length", max_length=64, truncation=True,
                                                            return_tensors="pt").input_ids
            return (ref.vision_model(pixel_values=pixels).pooler_output,
                    ref.text_model(input_ids=ids).pooler_output, pixels, ids)
        if name == "biomedclip":
            pixels = torch.stack([ref.preprocess(im) for im in images])
            ids = ref.tokenizer(texts)
            return ref.encode_image(pixels), ref.encode_text(ids), pixels, ids
        size = {"unimed-clip-b16": 32, "pmc-clip": 64, "conceptclip": 42}[name]
        mean, std = ((0.5,) * 3, (0.5,) * 3) if name == "conceptclip" else (OPENAI_MEAN, OPENAI_STD)
        transform = clip_eval_transform(size, mean, std, squash=name == "conceptclip")
        pixels = torch.stack([transform(im) for im in images])
        ids = hf_token_ids(root.parent, texts, 256 if name == "unimed-clip-b16" else 77)
        return ref.encode_image(pixels), ref.encode_text(ids), pixels, ids




CONCEPTS = ["pleural effusion", "nodule", "cardiomegaly of the heart"]


def conceptclip_reference_scores(ref, root: Path, images) -> torch.Tensor:
    """[N, C, P] per-patch concept logits computed the way ConceptCLIP's loss does, each concept's
    span being its own word pieces (after [CLS]) in the tokenized name."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir(root))
    ids = tok(CONCEPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    spans = [(1, 1 + len(tok(name, add_special_tokens=False).input_ids)) for name in CONCEPTS]
    pixels = torch.stack([clip_eval_transform(42, (0.5,) * 3, (0.5,) * 3, squash=True)(im) for im in images])
    with torch.no_grad():
        return ref.concept_scores(pixels, ids, spans)


def with_tokenizer_beside(checkpoint: Path, bert_dir: Path, target: Path) -> Path:
    """A folder as a user keeps one offline: the family's checkpoint plus its BERT's config and vocab."""
    target.mkdir()
    shutil.copy(checkpoint, target / checkpoint.name)
    for item in bert_dir.iterdir():
        shutil.copy(item, target / item.name)
    return target
