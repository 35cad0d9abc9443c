"""LaBo-style concept bottleneck classifier: a linear layer on concept scores of a frozen encoder.

Each class's logit is a weighted sum of (standardized) concept scores, so the weights read as
"class <- concepts": the concepts with the largest positive weights are the evidence for a class.
An L1 penalty keeps the explanation short.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from medclip import jsonio
from medclip.concepts.scoring import ConceptScorer
from medclip.errors import MedclipError


@dataclass(frozen=True)
class BottleneckConfig:
    epochs: int = 300
    lr: float = 0.05
    weight_decay: float = 1e-4
    l1: float = 1e-3
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or not self.lr > 0 or self.l1 < 0 or self.weight_decay < 0:
            raise MedclipError(f"invalid bottleneck config {self}")


class ConceptBottleneck:
    def __init__(self, concepts: Sequence[str], classes: Sequence[str], weight: torch.Tensor, bias: torch.Tensor,
                 mean: torch.Tensor, std: torch.Tensor):
        self.concepts, self.classes = list(concepts), list(classes)
        self.weight, self.bias, self.mean, self.std = weight, bias, mean, std

    @classmethod
    def fit(cls, scores: torch.Tensor, labels: Sequence[int], concepts: Sequence[str], classes: Sequence[str],
            config: BottleneckConfig | None = None) -> ConceptBottleneck:
        """Train on concept scores [N, C] and integer labels [N] (full batch, Adam)."""
        config = config or BottleneckConfig()
        scores = torch.as_tensor(scores, dtype=torch.float32)
        labels = torch.as_tensor(list(labels), dtype=torch.long)
        if scores.ndim != 2 or scores.shape[1] != len(concepts) or len(labels) != len(scores):
            raise MedclipError(f"scores must be [N, {len(concepts)}] with N labels; got {tuple(scores.shape)} "
                               f"and {len(labels)} labels")
        if len(classes) < 2 or labels.min() < 0 or labels.max() >= len(classes):
            raise MedclipError(f"labels must be class indices in [0, {len(classes)}) with at least 2 classes")
        mean, std = scores.mean(0), scores.std(0, unbiased=False).clamp_min(1e-6)
        x = (scores - mean) / std
        gen = torch.Generator().manual_seed(config.seed)
        layer = torch.nn.Linear(x.shape[1], len(classes))
        with torch.no_grad():
            layer.weight.normal_(0, 0.01, generator=gen)
            layer.bias.zero_()
        opt = torch.optim.Adam(layer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        for _ in range(config.epochs):
            opt.zero_grad()
            loss = F.cross_entropy(layer(x), labels) + config.l1 * layer.weight.abs().sum()
            loss.backward()
            opt.step()
        return cls(concepts, classes, layer.weight.detach().clone(), layer.bias.detach().clone(), mean, std)

    def logits(self, scores: torch.Tensor) -> torch.Tensor:
        x = (torch.as_tensor(scores, dtype=torch.float32) - self.mean) / self.std
        return x @ self.weight.T + self.bias

    def predict(self, scores: torch.Tensor) -> torch.Tensor:
        return self.logits(scores).argmax(dim=1)

    def class_evidence(self, cls: str | int, top: int = 5) -> list[tuple[str, float]]:
        """The concepts with the largest positive weights for a class: "class <- concepts"."""
        k = self.classes.index(cls) if isinstance(cls, str) else int(cls)
        values, index = self.weight[k].topk(min(top, len(self.concepts)))
        return [(self.concepts[i], float(v)) for v, i in zip(values.tolist(), index.tolist()) if v > 0]

    def describe(self, top: int = 5) -> str:
        lines = []
        for name in self.classes:
            evidence = ", ".join(f"{c} ({w:+.2f})" for c, w in self.class_evidence(name, top)) or "(no concept)"
            lines.append(f"{name} <- {evidence}")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        data = {"concepts": self.concepts, "classes": self.classes, "weight": self.weight.tolist(),
                "bias": self.bias.tolist(), "mean": self.mean.tolist(), "std": self.std.tolist()}
        path.write_text(jsonio.dumps(data))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ConceptBottleneck:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["concepts"], data["classes"], torch.tensor(data["weight"]), torch.tensor(data["bias"]),
                       torch.tensor(data["mean"]), torch.tensor(data["std"]))
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise MedclipError(f"cannot read concept bottleneck {path}: {exc}") from exc


def concept_scores(encoder, images: Sequence, concepts: Sequence[str], batch_size: int = 16) -> torch.Tensor:
    """[N, C] frozen-encoder concept scores (the bottleneck's inputs)."""
    scorer = ConceptScorer(encoder)
    vecs = scorer.concept_vectors(list(concepts))
    out = []
    for start in range(0, len(images), batch_size):
        pooled, patches = scorer.image_features(list(images[start:start + batch_size]), batch_size)
        out.append(scorer.image_scores(pooled, scorer.patch_scores(patches, vecs), vecs))
    return torch.cat(out)


def train_concept_bottleneck(encoder, images: Sequence, labels: Sequence[int], concepts: Sequence[str],
                             classes: Sequence[str], config: BottleneckConfig | None = None) -> ConceptBottleneck:
    """Concept scores of ``images`` from the frozen ``encoder``, then the linear layer on them."""
    return ConceptBottleneck.fit(concept_scores(encoder, images, concepts), labels, concepts, classes, config)
