"""Every public family through medclip.load, proven equal to its original forward pass.

For each family the test rebuilds the original model's forward pass as its authors wrote it (read
from their public code; written here from those facts, not copied) at reduced width and depth with
every structural feature kept, gives it random weights, saves it exactly as the family publishes it
(file names, key names, wrappers, config files), loads it with ``medclip.load(NAME, checkpoint=...)``
and checks equal image and text embeddings (atol 1e-5) and the same preprocessing (image size,
resize mode, mean/std, tokenizer, context length, padding). MedSigLIP's reference is transformers'
own ``SiglipModel``; BiomedCLIP's is open_clip's own hub loading.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

import medclip
from medclip.errors import MedclipError
from medclip.models.registry import ASSETS_DIR

TEXTS = ["axial CT of the chest with a right lower lobe nodule", "T2 weighted MRI of the brain",
         "chest x-ray   showing cardiomegaly."]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ATOL = 1e-5


def _images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (50 + 9 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random values in every parameter and BatchNorm statistic; norm gains near 1, so activations
    neither vanish nor blow up through the reduced towers."""
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.LayerNorm, nn.BatchNorm2d)
    with torch.no_grad():
        for mod in module.modules():
            is_norm = isinstance(mod, norms) or type(mod).__name__.endswith(("LayerNorm", "RMSNorm"))
            for name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen)
                if is_norm and name == "weight":
                    p.copy_(1 + 0.1 * noise)
                else:  # matrices and kernels at 1/sqrt(fan-in), biases and scalars small
                    p.copy_(noise / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.05 * noise)
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.running_mean.shape, generator=gen))
                mod.running_var.copy_(0.5 + torch.rand(mod.running_var.shape, generator=gen))
    return module.eval()


def _save_pt(state: dict, path: Path, prefix: str = "module.") -> Path:
    """A training checkpoint as these forks write it: DDP-prefixed state dict, epoch, name, optimizer."""
    sd = {prefix + k: v.detach().clone() for k, v in state.items()}
    torch.save({"epoch": 10, "name": "run", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)
    return path


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- shared pieces

def _bert_dir(root: Path) -> Path:
    """A reduced BiomedBERT/PubMedBERT directory: config (64-wide heads like the real ones) + vocab."""
    from transformers import BertConfig, BertTokenizerFast

    out = root / "bert"
    if not out.exists():
        BertTokenizerFast(vocab_file=str(ASSETS_DIR / "tiny-bert" / "vocab.txt"), do_lower_case=True).save_pretrained(out)
        BertConfig(vocab_size=4000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=256, max_position_embeddings=512).save_pretrained(out)
    return out


def _bert(root: Path, pooler: bool):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(_bert_dir(root)), add_pooling_layer=pooler)


def _hf_ids(root: Path, texts, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_bert_dir(root))
    return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def _clip_eval_transform(size: int, mean, std, squash: bool = False):
    """The eval transform of the forks' transform.py: bicubic resize (+ centre crop), RGB, tensor, normalize."""
    resize = [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)] if squash else \
        [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    return T.Compose([*resize, lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(mean, std)])


class _Block(nn.Module):
    """OpenAI/open_clip residual attention block (LND, nn.MultiheadAttention, c_fc/c_proj MLP)."""

    def __init__(self, width: int, heads: int, act: nn.Module):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", act),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------- UniMed-CLIP

class UniMedVisual(nn.Module):
    """The fork's VisualTransformer: bias-free patch conv, class token, ln_pre, QuickGELU blocks,
    ln_post on the class token, then proj."""

    def __init__(self, image=32, patch=8, width=64, layers=2, heads=1, out=32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((image // patch) ** 2 + 1, width))
        self.ln_pre, self.ln_post = nn.LayerNorm(width), nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_Block(width, heads, _QuickGELU()) for _ in range(layers)])
        self.proj = nn.Parameter(torch.zeros(width, out))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1), x], 1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_post(x.permute(1, 0, 2)[:, 0]) @ self.proj


class UniMedTextEncoder(nn.Module):
    """BertModel without pooler, mask ids != pad, CLS of the last hidden state, bias-free MLP projection."""

    def __init__(self, bert, out=32):
        super().__init__()
        self.transformer = bert
        d = bert.config.hidden_size
        self.proj = nn.Sequential(nn.Linear(d, (d + out) // 2, bias=False), nn.GELU(),
                                  nn.Linear((d + out) // 2, out, bias=False))

    def forward(self, ids):
        mask = (ids != self.transformer.config.pad_token_id).long()
        return self.proj(self.transformer(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])


class UniMedCLIP(nn.Module):
    def __init__(self, root: Path):
        super().__init__()
        self.visual = UniMedVisual()
        self.text_encoder = UniMedTextEncoder(_bert(root, pooler=False))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        return self.text_encoder(ids)


# ----------------------------------------------------------------------------- PMC-CLIP

class _Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False), nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)),
                                                         ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.avgpool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _AttnPool(nn.Module):
    def __init__(self, grid, dim, heads, out):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, dim))
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out)
        self.num_heads = heads

    def forward(self, x):
        x = x.flatten(2).permute(2, 0, 1)
        x = torch.cat([x.mean(0, keepdim=True), x]) + self.positional_embedding[:, None]
        out, _ = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], self.num_heads, None, torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            None, None, False, 0.0, self.c_proj.weight, self.c_proj.bias, training=False, need_weights=False,
            use_separate_proj_weight=True, q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight)
        return out[0]


class PMCVisual(nn.Module):
    """OpenAI CLIP's ModifiedResNet as PMC-CLIP's blocks.py has it (3-conv stem, avg-pool, attention pool)."""

    def __init__(self, layers=(1, 2, 1, 1), width=8, image=64, out=32):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv2, self.bn2 = nn.Conv2d(width // 2, width // 2, 3, 1, 1, bias=False), nn.BatchNorm2d(width // 2)
        self.conv3, self.bn3 = nn.Conv2d(width // 2, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        inplanes = width
        for i, (blocks, planes) in enumerate(zip(layers, (width, 2 * width, 4 * width, 8 * width)), start=1):
            stage = [_Bottleneck(inplanes, planes, 1 if i == 1 else 2)] + \
                [_Bottleneck(planes * 4, planes) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*stage))
            inplanes = planes * 4
        self.attnpool = _AttnPool(image // 32, width * 32, width * 32 // 64, out)

    def forward(self, x):
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        x = F.avg_pool2d(x, 2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


class PMCCLIP(nn.Module):
    """PMC_CLIP: image = ModifiedResNet; text = BERT **without attention mask**, hidden state at the
    [CLS] id's position @ text_projection. The MLM fusion parts exist in its state dict, unused here."""

    def __init__(self, root: Path, embed=32, context=77):
        super().__init__()
        self.visual = PMCVisual(out=embed)
        self.text_encoder = _bert(root, pooler=True)
        width = self.text_encoder.config.hidden_size
        self.positional_embedding = nn.Parameter(torch.zeros(context, width))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed))
        self.mlm_projection = nn.Parameter(torch.zeros(width, 4000))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.img_special_token = nn.Parameter(torch.zeros(1, 1, embed))
        self.fusion_module = nn.Module()
        self.fusion_module.resblocks = nn.ModuleList([_Block(width, 2, nn.GELU())])
        self.cls_id = 2

    def encode_image(self, x):
        return self.visual(x)

    def encode_text(self, ids):
        x = self.text_encoder(input_ids=ids).last_hidden_state
        where = torch.nonzero(ids == self.cls_id)
        return x[torch.arange(len(x)), where[:, 1]] @ self.text_projection


# ----------------------------------------------------------------------------- ConceptCLIP

CONCEPT_VISION = dict(img_size=42, patch_size=14, embed_dim=144, depth=2, num_heads=2, mlp_ratio=2.0)


class ConceptCLIP(nn.Module):
    """The fork's CustomTextCLIP: timm SigLIP trunk (map pool, no projection) returning (pooled, tokens);
    BERT (no pooler) with a mean pooler over the mask and a bias-free linear projection; concept heads
    image_proj / text_proj, concept_logit_scale / concept_logit_bias."""

    def __init__(self, root: Path):
        import timm

        super().__init__()
        self.visual = nn.Module()
        self.visual.trunk = timm.create_model("vit_so400m_patch14_siglip_384", pretrained=False, num_classes=0,
                                              global_pool="map", **CONCEPT_VISION)
        self.visual.head = nn.Sequential()
        bert = _bert(root, pooler=False)
        self.text = nn.Module()
        self.text.transformer = bert
        embed, d = CONCEPT_VISION["embed_dim"], bert.config.hidden_size
        self.text.proj = nn.Linear(d, embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.concept_logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.concept_logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.image_proj = nn.Sequential(nn.Linear(embed, embed, bias=False), nn.GELU(), nn.Linear(embed, embed, bias=False))
        self.text_proj = nn.Sequential(nn.Linear(d, embed, bias=False), nn.GELU(), nn.Linear(embed, embed, bias=False))

    def encode_image_tokens(self, x):
        tokens = self.visual.trunk.forward_features(x)
        return self.visual.head(self.visual.trunk.forward_head(tokens)), tokens

    def encode_image(self, x):
        return self.encode_image_tokens(x)[0]

    def encode_text_tokens(self, ids):
        mask = (ids != self.text.transformer.config.pad_token_id).long()
        states = self.text.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = (states * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        return self.text.proj(pooled), states

    def encode_text(self, ids):
        return self.encode_text_tokens(ids)[0]

    def concept_scores(self, images, ids, spans):
        """Per-patch concept logits as its loss computes them: image_proj on patch tokens, text_proj on
        token states, span mean, both normalized, exp(concept_logit_scale) * cos + concept_logit_bias."""
        patches = F.normalize(self.image_proj(self.encode_image_tokens(images)[1]), dim=-1)
        states = self.text_proj(self.encode_text_tokens(ids)[1])
        concepts = F.normalize(torch.stack([states[i, a:b].mean(0) for i, (a, b) in enumerate(spans)]), dim=-1)
        return self.concept_logit_scale.exp() * torch.einsum("npd,cd->ncp", patches, concepts) + self.concept_logit_bias


# ----------------------------------------------------------------------------- building the published forms

def _publish_unimed(root: Path):
    torch.manual_seed(11)
    ref = _randomize(UniMedCLIP(root), 11)
    path = _save_pt(ref.state_dict(), root / "unimed-clip-vit-b16.pt")
    return ref, path, dict(hf_text_dir=_bert_dir(root))


def _publish_pmc(root: Path):
    torch.manual_seed(12)
    ref = _randomize(PMCCLIP(root), 12)
    return ref, _save_pt(ref.state_dict(), root / "checkpoint.pt"), dict(hf_text_dir=_bert_dir(root))


def _publish_conceptclip(root: Path):
    torch.manual_seed(13)
    ref = _randomize(ConceptCLIP(root), 13)
    return ref, _save_pt(ref.state_dict(), root / "epoch_40.pt"), dict(hf_text_dir=_bert_dir(root))


def _timm_dir(root: Path, architecture: str, args: dict) -> Path:
    out = root / f"timm-{architecture}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"architecture": architecture, "model_args": args,
                                                 "pretrained_cfg": {}}))
    return out


BIOMEDCLIP_VISION = dict(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2)


def _publish_biomedclip(root: Path):
    """The hub snapshot's form: open_clip_config.json (BiomedBERT by hub id, no BERT config.json),
    open_clip_pytorch_model.bin, tokenizer files. The timm trunk is reduced through a timm config dir."""
    import open_clip
    from transformers import AutoTokenizer

    timm_dir = _timm_dir(root, "vit_base_patch16_224", BIOMEDCLIP_VISION)
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
    ref_cfg["text_cfg"]["hf_model_name"] = str(_bert_dir(root))
    build_cfg = json.loads(json.dumps(ref_cfg))
    build_cfg["text_cfg"]["hf_model_pretrained"] = False
    torch.manual_seed(14)
    ref = _randomize(open_clip.model.CustomTextCLIP(**build_cfg), 14)
    snapshot = root / "biomedclip-snapshot"
    snapshot.mkdir()
    (snapshot / "open_clip_config.json").write_text(json.dumps(hub, indent=4))
    state = ref.state_dict()
    state["text.transformer.embeddings.position_ids"] = torch.arange(512)[None]  # older transformers saved it
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    AutoTokenizer.from_pretrained(_bert_dir(root)).save_pretrained(snapshot)
    reference = root / "biomedclip-reference"
    shutil.copytree(snapshot, reference)
    (reference / "open_clip_config.json").write_text(json.dumps(dict(hub, model_cfg=ref_cfg)))
    ref_model, _, ref_preprocess = open_clip.create_model_and_transforms(f"local-dir:{reference}")
    ref_model.tokenizer = open_clip.get_tokenizer(f"local-dir:{reference}")
    ref_model.preprocess = ref_preprocess
    return ref_model.eval(), snapshot, {}


def _spm_files(root: Path) -> Path:
    import sentencepiece as spm

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 3 + ["a photo of a chest x-ray", "pleural effusion and nodule",
                                             "an MRI scan of the knee", "histopathology slide of the colon"]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(root / "spiece"), vocab_size=50,
                                   model_type="unigram", eos_id=1, unk_id=2, pad_id=-1, bos_id=-1,
                                   user_defined_symbols=[], minloglevel=2)
    return root / "spiece.model"


def _publish_medsiglip(root: Path):
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
    ref = _randomize(SiglipModel(config), 15)
    snapshot = root / "medsiglip-snapshot"
    ref.save_pretrained(snapshot)
    SiglipTokenizer(vocab_file=str(_spm_files(root)), model_max_length=64).save_pretrained(snapshot)
    SiglipImageProcessor(size={"height": 56, "width": 56}, resample=2).save_pretrained(snapshot)
    return ref, snapshot, {}


PUBLISHERS = {"unimed-clip-b16": _publish_unimed, "pmc-clip": _publish_pmc, "conceptclip": _publish_conceptclip,
              "biomedclip": _publish_biomedclip, "medsiglip-448": _publish_medsiglip}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """name -> (reference model, published checkpoint path, load kwargs)."""
    root = tmp_path_factory.mktemp("published")
    return {name: make(root) for name, make in PUBLISHERS.items()}


# ----------------------------------------------------------------------------- reference forward passes

def _reference_features(name: str, ref, root: Path, images, texts):
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
        transform = _clip_eval_transform(size, mean, std, squash=name == "conceptclip")
        pixels = torch.stack([transform(im) for im in images])
        ids = _hf_ids(root.parent, texts, 256 if name == "unimed-clip-b16" else 77)
        return ref.encode_image(pixels), ref.encode_text(ids), pixels, ids


@pytest.mark.parametrize("name", list(PUBLISHERS))
def test_family_loads_equal_to_its_original(published, name):
    ref, path, kwargs = published[name]
    encoder = medclip.load(name, checkpoint=path, device="cpu", **kwargs)
    images = _images()
    ref_img, ref_txt, ref_pixels, ref_ids = _reference_features(name, ref, path, images, TEXTS)
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    ids = encoder.tokenize(TEXTS)
    # Preprocessing: same pixels (size, resize mode, interpolation, mean/std) and same token ids
    # (tokenizer, context length, padding).
    assert pixels.shape == ref_pixels.shape
    torch.testing.assert_close(pixels, ref_pixels, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref_ids)
    image_diff = _close(encoder.encode_image(ref_pixels, normalize=False), ref_img)
    text_diff = _close(encoder.encode_text(TEXTS, normalize=False), ref_txt)
    print(f"{name}: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}, "
          f"pixels {tuple(pixels.shape[1:])}, context {ids.shape[1]}")


CONCEPTS = ["pleural effusion", "nodule", "cardiomegaly of the heart"]


def _conceptclip_reference_scores(ref, root: Path, images) -> torch.Tensor:
    """[N, C, P] per-patch concept logits computed the way ConceptCLIP's loss does, each concept's
    span being its own word pieces (after [CLS]) in the tokenized name."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_bert_dir(root))
    ids = tok(CONCEPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    spans = [(1, 1 + len(tok(name, add_special_tokens=False).input_ids)) for name in CONCEPTS]
    pixels = torch.stack([_clip_eval_transform(42, (0.5,) * 3, (0.5,) * 3, squash=True)(im) for im in images])
    with torch.no_grad():
        return ref.concept_scores(pixels, ids, spans)


def test_conceptclip_heads_score_patches_like_the_original(published, tmp_path, capsys):
    from medclip.cli import main
    from medclip.concepts.scoring import ConceptScorer

    ref, path, kwargs = published["conceptclip"]
    encoder = medclip.load("conceptclip", checkpoint=path, device="cpu", **kwargs)
    assert encoder.heads is not None and encoder.heads.config.concept_head_on_tokens
    images = _images()
    expected = _conceptclip_reference_scores(ref, path.parent, images)
    scorer = ConceptScorer(encoder)
    assert scorer.method == "pc_align"
    image_scores, patch_scores = scorer.score(images, CONCEPTS)
    assert patch_scores.shape == expected.shape == (2, 3, 9)
    torch.testing.assert_close(patch_scores, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(image_scores, expected.max(-1).values, atol=ATOL, rtol=0)

    # The commands a user runs, on ConceptCLIP's own checkpoint with its concept scale and bias.
    image_path = tmp_path / "scan.png"
    images[0].save(image_path)
    model_args = ["--model", "conceptclip", "--checkpoint", str(path), "--hf-text-dir", str(kwargs["hf_text_dir"]),
                  "--device", "cpu", "--concepts", ",".join(CONCEPTS)]
    assert main(["concepts", "zero-shot", str(image_path), *model_args, "--top-k", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_name = {c["name"]: c["score"] for c in row["concepts"]}
    want = _conceptclip_reference_scores(ref, path.parent, [Image.open(image_path)])[0].max(-1).values
    assert by_name == pytest.approx(dict(zip(CONCEPTS, want.tolist())), abs=1e-4)
    assert main(["explain", str(image_path), *model_args, "-o", str(tmp_path / "maps.png")]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{"):])
    assert shown["method"] == "pc_align" and (tmp_path / "maps.png").stat().st_size > 0
    assert {c["name"]: c["score"] for c in shown["concepts"]} == pytest.approx(dict(zip(CONCEPTS, want.tolist())),
                                                                              abs=1e-4)


# Plain open_clip, nothing of medclip imported: each converted directory from inside it (exports name
# their bundled towers relative to themselves), open_clip's own transform and tokenizer.
PLAIN_OPEN_CLIP = textwrap.dedent("""
    import json, os, sys
    import torch
    import open_clip
    from PIL import Image

    texts, images = json.loads(sys.argv[1]), [Image.open(p) for p in sys.argv[2].split(",")]
    for directory in sys.argv[3:]:
        os.chdir(directory)
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
        tokenizer = open_clip.get_tokenizer("local-dir:.")
        with torch.no_grad():
            pixels, ids = torch.stack([preprocess(im) for im in images]), tokenizer(texts)
            torch.save({"image": model.eval().encode_image(pixels), "text": model.encode_text(ids),
                        "pixels": pixels, "ids": ids}, "plain_open_clip.pt")
    assert not [m for m in sys.modules if m.split(".")[0] == "medclip"], "medclip was imported"
    print("ok")
""")


def test_convert_writes_each_family_for_plain_open_clip(published, tmp_path, capsys):
    from medclip.cli import main

    outs = {}
    for name, (_, path, kwargs) in published.items():
        outs[name] = tmp_path / name
        extra = ["--hf-text-dir", str(kwargs["hf_text_dir"])] if "hf_text_dir" in kwargs else []
        assert main(["convert", f"{name}={path}", str(outs[name]), *extra]) == 0
        assert "open_clip.create_model_and_transforms" in capsys.readouterr().out
    images = _images()
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, json.dumps(TEXTS), ",".join(paths),
                           *map(str, outs.values())], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    for name, out in outs.items():
        ref, path, _ = published[name]
        ref_img, ref_txt, ref_pixels, ref_ids = _reference_features(name, ref, path, images, TEXTS)
        got = torch.load(out / "plain_open_clip.pt")
        torch.testing.assert_close(got["pixels"], ref_pixels, atol=1e-5, rtol=0)
        assert torch.equal(got["ids"], ref_ids), name
        image_diff, text_diff = _close(got["image"], ref_img), _close(got["text"], ref_txt)
        print(f"{name} via medclip convert + plain open_clip: max |image diff| {image_diff:.2e}, "
              f"max |text diff| {text_diff:.2e}")


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(MedclipError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_wrong_checkpoints_name_the_family_and_the_first_unmatched_keys(published, tmp_path):
    unimed_path, pmc_path = published["unimed-clip-b16"][1], published["pmc-clip"][1]
    bert = str(published["unimed-clip-b16"][2]["hf_text_dir"])
    # A checkpoint of another family.
    _one_line_error(lambda: medclip.load("pmc-clip", checkpoint=unimed_path, hf_text_dir=bert),
                    "pmc-clip:", "is not a PMC-CLIP checkpoint", "looks like a UniMed-CLIP checkpoint",
                    "missing visual.attnpool.c_proj.weight", "did not match: visual.class_embedding")
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=published["conceptclip"][1]),
                    "not a UniMed-CLIP checkpoint", "looks like a ConceptCLIP checkpoint",
                    "did not match: logit_bias, concept_logit_scale")
    _one_line_error(lambda: medclip.load("medsiglip-448", checkpoint=published["biomedclip"][1]),
                    "medsiglip-448:", "config.json")
    _one_line_error(lambda: medclip.load(pmc_path), "looks like a PMC-CLIP checkpoint",
                    f"medclip.load('pmc-clip', checkpoint='{pmc_path}')")
    # A snapshot with a file missing.
    for name, drop in (("medsiglip-448", "model.safetensors"), ("biomedclip", "open_clip_pytorch_model.bin")):
        broken = tmp_path / f"{name}-broken"
        shutil.copytree(published[name][1], broken)
        (broken / drop).unlink()
        _one_line_error(lambda n=name, b=broken: medclip.load(n, checkpoint=b), f"{name}:", "has no weights", drop)
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=tmp_path), "unimed-clip-b16:",
                    "unimed-clip-vit-b16.pt")
    # Shapes that do not fit: a text tower config of another size.
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=unimed_path,
                                         hf_text_dir=ASSETS_DIR / "tiny-bert"),
                    "unimed-clip-b16 (UniMed-CLIP):", "does not fit the architecture", "shape mismatches",
                    "text.transformer.encoder.layer.0.intermediate.dense.weight (256, 128) vs model (512, 128)")


def _with_tokenizer_beside(checkpoint: Path, bert_dir: Path, target: Path) -> Path:
    """A folder as a user keeps one offline: the family's checkpoint plus its BERT's config and vocab."""
    target.mkdir()
    shutil.copy(checkpoint, target / checkpoint.name)
    for item in bert_dir.iterdir():
        shutil.copy(item, target / item.name)
    return target


def test_one_eval_suite_command_compares_families(published, tmp_path):
    from conftest import require_shared

    from medclip.cli import main
    from medclip.evaluation.report import read_results

    require_shared("medpix", "dev.jsonl")
    bert = published["unimed-clip-b16"][2]["hf_text_dir"]
    unimed = _with_tokenizer_beside(published["unimed-clip-b16"][1], bert, tmp_path / "unimed")
    pmc = _with_tokenizer_beside(published["pmc-clip"][1], bert, tmp_path / "pmc")
    out = tmp_path / "compare"
    assert main(["eval", "suite", "shared_real", "--datasets", "medpix_modality", "--model", f"unimed-clip-b16={unimed}",
                 "--model", f"biomedclip={published['biomedclip'][1]}", "--model", f"pmc-clip={pmc}",
                 "--out", str(out), "--workers", "0", "--no-plots", "--no-progress", "--device", "cpu"]) == 0
    rows = (out / "summary.md").read_text().splitlines()
    assert rows[0].startswith("| model | medpix_modality [mean_per_class_recall]")
    assert sorted(r.split("|")[1].strip() for r in rows[2:] if r.startswith("| ")) == \
        ["biomedclip", "pmc-clip", "unimed-clip-b16"]
    assert {r["model"] for r in read_results(out)} == {"biomedclip", "pmc-clip", "unimed-clip-b16"}
    assert all(r["n_samples"] > 100 for r in read_results(out))


def test_open_clip_entry_points_take_a_family_checkpoint(published):
    import open_clip

    ref, path, kwargs = published["unimed-clip-b16"]
    model, train, val = medclip.create_model_and_transforms("unimed-clip-b16", pretrained=str(path), **kwargs)
    assert isinstance(model, open_clip.model.CustomTextCLIP) and model.visual.image_size == (32, 32)
    tokenizer = medclip.get_tokenizer("unimed-clip-b16", **kwargs)
    image = _images(1)
    ref_img, ref_txt, _, _ = _reference_features("unimed-clip-b16", ref, path, image, TEXTS)
    with torch.no_grad():
        _close(model.encode_image(torch.stack([val(im) for im in image])), ref_img)
        _close(model.encode_text(tokenizer(TEXTS)), ref_txt)
    assert tokenizer(TEXTS).shape == (3, 256)


def test_unimed_checkpoint_also_loads_into_an_architecture_by_name(published, tmp_path):
    """The checkpoint form `medclip.load(ARCH, checkpoint=unimed.pt)` (text_encoder.* keys, {"state_dict"},
    module. prefix), with the architecture registered as an open_clip config."""
    import open_clip

    from medclip.models import families, pretrained

    ref, path, kwargs = published["unimed-clip-b16"]
    model_cfg = families.get("unimed").read(path, pretrained.get("unimed-clip-b16"), kwargs["hf_text_dir"]).model_cfg
    (tmp_path / "unimed-reduced-arch.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "unimed-reduced-arch.json")
    encoder = medclip.load("unimed-reduced-arch", checkpoint=path, device="cpu")
    ref_img, ref_txt, pixels, _ = _reference_features("unimed-clip-b16", ref, path, _images(), TEXTS)
    _close(encoder.encode_image(pixels), ref_img)
    _close(encoder.encode_text(TEXTS), ref_txt)


def test_named_models_are_fetched_from_where_they_are_published(published, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_file(repo_id, filename, repo_type=None, **_):
        calls.append((repo_id, filename, repo_type))
        return str(published["pmc-clip"][1])

    def fake_snapshot(repo_id, repo_type=None, **_):
        calls.append((repo_id, None, repo_type))
        return str(published["medsiglip-448"][1])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert medclip.load("pmc-clip", device="cpu", **published["pmc-clip"][2]).name == "pmc-clip"
    assert medclip.load("medsiglip-448", device="cpu").embed_dim == 48
    assert calls == [("axiong/pmc_oa_beta", "checkpoint.pt", "dataset"), ("google/medsiglip-448", None, "model")]

    def offline(*_, **__):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    _one_line_error(lambda: medclip.load("unimed-clip-b16"), "cannot fetch unimed-clip-b16 from "
                    "https://huggingface.co/UzairK/unimed-clip-vit-b16/blob/main/unimed-clip-vit-b16.pt",
                    "medclip.load('unimed-clip-b16', checkpoint=PATH)")
    _one_line_error(lambda: medclip.load("conceptclip"), "(gated: accept its terms")
