"""Concept-level zero-shot scored against concept labels: does a concept score higher on the images
that show it than on the images that do not? (AUC per concept, one-vs-rest over all images.)

Labels come from the shards' sample JSON: a concept is present when a caption of the sample mentions
it without negation (``concepts`` entries ``{name, cui, negated?}``; the demo set's format, and what
``medclip concepts annotate`` writes). Scores are those of ``medclip concepts zero-shot``: the max
patch logit of the PC-Align heads, or the pooled image-text cosine of the name for models without
heads (or with ``use_heads=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medclip.concepts.scoring import ConceptScorer
from medclip.concepts.shards import expand_shards, iter_shard_samples, sample_image
from medclip.errors import MedclipError
from medclip.evaluation.metrics import per_class_auc

log = logging.getLogger(__name__)


@dataclass
class ConceptLabelRecord:
    image: object  # path, PIL image or array
    present: frozenset[str]  # names of the concepts the image shows
    key: str = ""


@dataclass
class ConceptZeroShotResult:
    method: str
    n_images: int
    mean_auc: float  # over concepts with both positive and negative images
    per_concept: dict[str, dict] = field(default_factory=dict)  # name -> {auc, positives}

    def to_dict(self) -> dict:
        return {"method": self.method, "n_images": self.n_images, "mean_auc": self.mean_auc,
                "per_concept": self.per_concept}


def present_concepts(record: dict) -> frozenset[str] | None:
    """Names of a sample's non-negated concept mentions; None when the sample carries no concept field."""
    mentions = record.get("concepts")
    if mentions is None:
        return None
    return frozenset(str(m.get("name") or m.get("cui")) for m in mentions if not m.get("negated"))


def concept_label_records_from_shards(paths) -> list[ConceptLabelRecord]:
    """One record per image of the shards; samples without a ``concepts`` field are skipped and counted."""
    records, unlabelled = [], 0
    for shard in expand_shards(paths):
        for sample in iter_shard_samples(shard):
            present = present_concepts(sample.get("json") or {})
            if present is None or "image" not in sample:
                unlabelled += 1
                continue
            records.append(ConceptLabelRecord(sample_image(sample, shard), present, sample["key"]))
    if unlabelled:
        log.warning("concept zero-shot: %d sample(s) without concept labels or image skipped", unlabelled)
    if not records:
        raise MedclipError("the shards hold no images with concept labels ('concepts' in the sample JSON)")
    return records


def concept_scores(encoder, images: Sequence, names: Sequence[str], use_heads: bool | None = None,
                   batch_size: int = 32) -> tuple[torch.Tensor, str]:
    """([N, C] image-level concept scores, scoring method), batch by batch (bounded memory)."""
    scorer = ConceptScorer(encoder, use_heads)
    vectors = scorer.concept_vectors(list(names))
    rows = []
    for start in range(0, len(images), batch_size):
        pooled, patches = scorer.image_features(list(images[start:start + batch_size]), batch_size)
        rows.append(scorer.image_scores(pooled, scorer.patch_scores(patches, vectors), vectors))
    return torch.cat(rows), scorer.method


def evaluate_concept_zero_shot(encoder, records: Sequence[ConceptLabelRecord], concepts: Sequence[str] | None = None,
                               use_heads: bool | None = None, batch_size: int = 32) -> ConceptZeroShotResult:
    """AUC per concept of the image-level concept scores against the records' labels.

    ``concepts`` defaults to every concept present in some record. A concept present in all or in
    none of the images has no AUC (reported as None, left out of the mean).
    """
    if not records:
        raise MedclipError("no records to evaluate concept zero-shot on")
    names = list(concepts) if concepts else sorted(set().union(*(r.present for r in records)))
    if not names:
        raise MedclipError("no concept is present in any record: give the concept names to score")
    scores, method = concept_scores(encoder, [r.image for r in records], names, use_heads, batch_size)
    labels = np.array([[name in r.present for name in names] for r in records], dtype=np.int64)
    aucs = per_class_auc(scores.numpy(), labels)
    per_concept = {name: {"auc": None if np.isnan(auc) else auc, "positives": int(labels[:, c].sum())}
                   for c, (name, auc) in enumerate(zip(names, aucs))}
    valid = [a for a in aucs if not np.isnan(a)]
    if not valid:
        raise MedclipError("no concept has both positive and negative images: AUC is undefined")
    return ConceptZeroShotResult(method, len(records), float(np.mean(valid)), per_concept)
