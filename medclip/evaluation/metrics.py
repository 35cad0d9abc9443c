"""Metric definitions, named as CLIP_benchmark names them.

Classification: ``acc1``, ``acc5`` (NaN under 5 classes), ``mean_per_class_recall`` (balanced
accuracy), plus ``macro_f1`` and ``auc`` (one-vs-rest, macro over classes that have both
positives and negatives). Multi-label: ``mean_average_precision`` (CLIP_benchmark's AP
definition) and per-class AUC. Retrieval: ``image_retrieval_recall@k`` (text -> image) and
``text_retrieval_recall@k`` (image -> text), a hit when any positive is in the top k, plus mean
and median rank of the first positive. Similarities are computed block by block so the full
[texts x images] matrix never exists at once.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from medclip.errors import MedclipError


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: tuple[int, ...]) -> list[float]:
    """Fraction of rows whose target is among the k highest logits (torch.topk, as CLIP_benchmark)."""
    pred = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices
    correct = pred.eq(target.view(-1, 1))
    return [float(correct[:, :k].sum().item()) / len(target) for k in ks]


def per_class_auc(scores: np.ndarray, onehot: np.ndarray) -> list[float]:
    """ROC AUC of each class column; NaN for a class without both positives and negatives."""
    out = []
    for c in range(scores.shape[1]):
        y = onehot[:, c]
        out.append(float(roc_auc_score(y, scores[:, c])) if 0 < y.sum() < len(y) else float("nan"))
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict:
    """Single-label metrics from logits [N, C] and integer targets [N]."""
    if len(target) == 0:
        raise MedclipError("no labelled samples to evaluate")
    logits, target = logits.float(), target.long()
    pred = logits.argmax(dim=1)
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, target, (1,)), float("nan")
    y_true, y_pred = target.numpy(), pred.numpy()
    probs = torch.softmax(logits, dim=1).numpy()
    onehot = np.eye(num_classes, dtype=np.int64)[y_true]
    class_auc = per_class_auc(probs, onehot)
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=np.unique(y_true), zero_division=0)),
        "auc": _nanmean(class_auc),
        "per_class_auc": class_auc,
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(range(num_classes))).tolist(),
    }


def average_precision_per_class(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of each class column as CLIP_benchmark defines it (precision summed at each positive)."""
    order = torch.argsort(scores, dim=0, descending=True, stable=True)
    truth = torch.gather(targets.float(), 0, order)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float32).unsqueeze(1)
    precision = truth.cumsum(0) / ranks
    return (precision * truth).sum(0) / truth.sum(0).clamp(min=1)


def multilabel_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Multi-label metrics from logits [N, C] and 0/1 targets [N, C]."""
    ap = average_precision_per_class(logits.float(), targets)
    class_auc = per_class_auc(logits.float().numpy(), targets.numpy().astype(np.int64))
    return {
        "mean_average_precision": float(ap.mean().item()),
        "per_class_average_precision": ap.tolist(),
        "auc": _nanmean(class_auc),
        "per_class_auc": class_auc,
    }


def _first_positive_ranks(queries: torch.Tensor, items: torch.Tensor, positive, max_elements: int) -> torch.Tensor:
    """1-based rank of the best-scored positive item of each query, a block of queries at a time.

    A negative scored equal to that positive ranks ahead of it when it comes first in item order (a
    stable sort): ties never favour the model, a collapsed model (all scores equal) gets chance,
    k/N, as in CLIP_benchmark, whose ``torch.topk`` breaks ties in an unspecified order.

    ``positive(start, end)`` returns the bool [end-start, n_items] positive mask of that block; a
    block holds at most ``max_elements`` scores, so memory stays flat for 100k-item sets.
    """
    block = max(1, max_elements // max(1, len(items)))
    ranks = []
    for start in range(0, len(queries), block):
        end = min(start + block, len(queries))
        scores = queries[start:end] @ items.T
        pos = positive(start, end)
        if not bool(pos.any(dim=1).all()):
            raise MedclipError("a retrieval query has no positive item")
        best = scores.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values
        tied = scores == best
        first = (pos & tied).int().argmax(dim=1, keepdim=True)  # the first positive scoring `best`
        earlier = torch.arange(scores.shape[1], device=scores.device)[None, :] < first
        ranks.append(((scores > best) | (tied & earlier)).sum(dim=1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor,
                      recall_ks: tuple[int, ...] = (1, 5, 10), max_elements: int = 1 << 24) -> dict:
    """Recall@k both ways plus mean/median rank; ``text_to_image[t]`` is the image index of text t."""
    text_to_image = text_to_image.long()
    n_images = len(image_emb)
    image_ids = torch.arange(n_images)

    def texts_positive(start, end):  # text block -> its one image
        return text_to_image[start:end, None] == image_ids[None, :]

    def images_positive(start, end):  # image block -> all its captions
        return image_ids[start:end, None] == text_to_image[None, :]

    t2i = _first_positive_ranks(text_emb, image_emb, texts_positive, max_elements).float()
    i2t = _first_positive_ranks(image_emb, text_emb, images_positive, max_elements).float()
    metrics = {}
    for k in recall_ks:
        metrics[f"image_retrieval_recall@{k}"] = float((t2i <= k).float().mean())
        metrics[f"text_retrieval_recall@{k}"] = float((i2t <= k).float().mean())
    metrics.update({
        "image_retrieval_mean_rank": float(t2i.mean()), "image_retrieval_median_rank": float(np.median(t2i.numpy())),
        "text_retrieval_mean_rank": float(i2t.mean()), "text_retrieval_median_rank": float(np.median(i2t.numpy())),
    })
    return metrics
