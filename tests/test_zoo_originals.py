"""The public families' original forward passes, rebuilt from their authors' code.

Each reference model is written here from facts read in the family's public code (not copied): its
modules, key names and forward pass, at reduced width and depth with every structural feature kept.
``test_zoo_published.py`` gives them random weights and saves them as the families publish them; the
tests in ``test_zoo_families.py`` load those with medclip. No test functions here.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms as T

from medclip.models.registry import ASSETS_DIR

TEXTS = ["axial CT of the chest with a right lower lobe nodule", "T2 weighted MRI of the brain",
         "chest x-ray   showing cardiomegaly."]
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
ATOL = 1e-5


def sample_images(n: int = 2) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (50 + 9 * i, 70, 3), dtype=np.uint8)) for i in range(n)]


def randomize(module: nn.Module, seed: int) -> nn.Module:
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


def save_training_checkpoint(state: dict, path: Path, prefix: str = "module.") -> Path:
    """A training checkpoint as these forks write it: DDP-prefixed state dict, epoch, name, optimizer."""
    sd = {prefix + k: v.detach().clone() for k, v in state.items()}
    torch.save({"epoch": 10, "name": "run", "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}, path)
    return path


def assert_same_embeddings(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- shared pieces

def bert_dir(root: Path) -> Path:
    """A reduced BiomedBERT/PubMedBERT directory: config (64-wide heads like the real ones) + vocab."""
    from transformers import BertConfig, BertTokenizerFast

    out = root / "bert"
    if not out.exists():
        BertTokenizerFast(vocab_file=str(ASSETS_DIR / "tiny-bert" / "vocab.txt"), do_lower_case=True).save_pretrained(out)
        BertConfig(vocab_size=4000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=256, max_position_embeddings=512).save_pretrained(out)
    return out


def bert_model(root: Path, pooler: bool):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig.from_pretrained(bert_dir(root)), add_pooling_layer=pooler)


def hf_token_ids(root: Path, texts, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bert_dir(root))
    return tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids


def clip_eval_transform(size: int, mean, std, squash: bool = False):
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
        self.text_encoder = UniMedTextEncoder(bert_model(root, pooler=False))
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
        self.text_encoder = bert_model(root, pooler=True)
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
        bert = bert_model(root, pooler=False)
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
