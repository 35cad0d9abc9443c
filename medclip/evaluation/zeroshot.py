"""Zero-shot classification: prompt-ensembled class embeddings, cosine logits, metrics.

A class embedding is the mean of its prompts' normalized text embeddings, renormalized (CLIP's
and UniMed-CLIP's ensembling). All prompts of all classes go through the text tower in one
batched pass; all images in batches; logits are one matrix product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from medclip.errors import MedclipError
from medclip.evaluation.datasets import EvalData
from medclip.evaluation.metrics import classification_metrics, multilabel_metrics
from medclip.evaluation.model import EmbedOptions, EvalModel

log = logging.getLogger(__name__)

LOGIT_SCALE = 100.0  # CLIP_benchmark's fixed scale; argmax and AUC do not depend on it


@dataclass
class ClassSpec:
    """Classes of one task: raw label values, display names and prompts.

    ``labels[i]`` is the value stored in the data (``"MRI"``); ``names[i]`` fills ``{c}`` in
    templates (``"magnetic resonance imaging"``); ``prompts[labels[i]]``, when given, is that
    class's own sentence list (UniMed-CLIP style) and replaces the templates for it.
    """

    labels: list[str]
    names: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    prompts: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        self.labels = [str(x) for x in self.labels]
        self.names = [str(x) for x in self.names] or list(self.labels)
        if len(self.names) != len(self.labels):
            raise MedclipError(f"{len(self.names)} class names for {len(self.labels)} classes")
        if len(set(self.labels)) != len(self.labels):
            raise MedclipError(f"duplicate class labels in {self.labels}")
        for template in self.templates:
            if "{c}" not in template:
                raise MedclipError(f"template {template!r} has no {{c}} placeholder")
        unknown = set(self.prompts) - set(self.labels)
        if unknown:
            raise MedclipError(f"prompts given for unknown classes {sorted(unknown)}")

    def class_prompts(self) -> list[list[str]]:
        missing = [lab for lab in self.labels if not self.prompts.get(lab)]
        if missing and not self.templates:
            raise MedclipError(f"classes {missing} have neither templates nor a prompt list")
        return [list(self.prompts.get(lab) or [t.format(c=name) for t in self.templates])
                for lab, name in zip(self.labels, self.names)]


def class_embeddings(model: EvalModel, spec: ClassSpec) -> torch.Tensor:
    """[C, D]: per class, the renormalized mean of its normalized prompt embeddings."""
    prompts = spec.class_prompts()
    flat = [p for ps in prompts for p in ps]
    emb = model.embed_texts(flat)
    owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(p) for p in prompts]))
    sums = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums / torch.bincount(owner).unsqueeze(1).float(), dim=-1)


def _split_multi(value, separator: str | None) -> list[str]:
    if isinstance(value, list):
        return [str(v).strip() for v in value]
    if value is None:
        return []
    text = str(value)
    return [v.strip() for v in text.split(separator)] if separator else [text.strip()]


@dataclass
class Targets:
    indices: list[int]  # samples kept
    target: torch.Tensor  # [N] class ids, or [N, C] 0/1 for multi-label
    skipped: int


def build_targets(data: EvalData, label_field: str, spec: ClassSpec, multilabel: bool = False,
                  separator: str | None = None) -> Targets:
    """Class targets for samples whose label is one of ``spec.labels``; others are counted and skipped."""
    index = {lab: i for i, lab in enumerate(spec.labels)}
    keep, targets, skipped = [], [], 0
    for i, row in enumerate(data.labels):
        value = row.get(label_field)
        if multilabel:
            present = [index[v] for v in _split_multi(value, separator) if v in index]
            if value is None:
                skipped += 1
                continue
            vec = [0] * len(spec.labels)
            for c in present:
                vec[c] = 1
            keep.append(i)
            targets.append(vec)
        else:
            value = None if value is None else str(value).strip()
            if value not in index:
                skipped += 1
                continue
            keep.append(i)
            targets.append(index[value])
    if skipped:
        log.warning("%s: %d of %d samples have no %r label among the %d classes; skipped", data.name, skipped,
                    len(data), label_field, len(spec.labels))
    if not keep:
        raise MedclipError(f"{data.name}: no sample has a {label_field!r} label among {spec.labels}")
    return Targets(keep, torch.tensor(targets, dtype=torch.long), skipped)


@dataclass
class ZeroShotResult:
    metrics: dict
    logits: torch.Tensor
    target: torch.Tensor
    n_samples: int
    n_skipped: int


def zero_shot(model: EvalModel, data: EvalData, label_field: str, spec: ClassSpec, multilabel: bool = False,
              separator: str | None = None, options: EmbedOptions | None = None,
              image_features: torch.Tensor | None = None) -> ZeroShotResult:
    """Zero-shot classification of ``data`` by the field ``label_field``."""
    targets = build_targets(data, label_field, spec, multilabel, separator)
    kept = data.subset(targets.indices)
    feats = image_features[targets.indices] if image_features is not None else model.embed_images(kept, options)
    logits = LOGIT_SCALE * feats @ class_embeddings(model, spec).T
    metrics = (multilabel_metrics(logits, targets.target) if multilabel
               else classification_metrics(logits, targets.target, len(spec.labels)))
    return ZeroShotResult(metrics, logits, targets.target, len(targets.indices), targets.skipped)
