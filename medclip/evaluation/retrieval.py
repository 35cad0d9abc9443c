"""Image-text retrieval: every caption of an image is a positive for it (and it for them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from medclip.errors import MedclipError
from medclip.evaluation.datasets import EvalData
from medclip.evaluation.metrics import retrieval_metrics
from medclip.evaluation.model import EmbedOptions, EvalModel

log = logging.getLogger(__name__)


@dataclass
class RetrievalResult:
    metrics: dict
    n_images: int
    n_texts: int
    n_skipped: int


def retrieval(model: EvalModel, data: EvalData, recall_ks: tuple[int, ...] = (1, 5, 10),
              options: EmbedOptions | None = None, max_elements: int = 1 << 24) -> RetrievalResult:
    """Retrieval over ``data``'s images and captions; images without a caption are skipped and counted."""
    keep = [i for i, caps in enumerate(data.captions) if caps]
    skipped = len(data) - len(keep)
    if skipped:
        log.warning("%s: %d of %d images have no caption; skipped for retrieval", data.name, skipped, len(data))
    if not keep:
        raise MedclipError(f"{data.name}: no image has a caption, nothing to retrieve")
    kept = data.subset(keep)
    texts = [c for caps in kept.captions for c in caps]
    owner = torch.repeat_interleave(torch.arange(len(kept)), torch.tensor([len(c) for c in kept.captions]))
    image_emb = model.embed_images(kept, options)
    text_emb = model.embed_texts(texts)
    metrics = retrieval_metrics(image_emb, text_emb, owner, recall_ks, max_elements)
    return RetrievalResult(metrics, len(kept), len(texts), skipped)
