"""CLIP_benchmark's linear probe procedure, on cached features, on any device.

The same steps as ``clip_benchmark.metrics.linear_probe.evaluate`` (1.6.x) after its features are
cached, so that the two give the same numbers on the same features (tested bit for bit):

- the training features are put in the order of ``torch.randperm`` after ``torch.manual_seed(seed)``;
- each probe is a ``torch.nn.Linear`` made after ``torch.manual_seed(seed)``, trained with AdamW
  (learning rate ``lr``, the weight decay under test) and cross-entropy for ``epochs`` epochs over a
  shuffled ``DataLoader`` of ``batch_size``, on a cosine schedule without warmup stepped every batch;
- with a validation split, the weight decay is searched on ``logspace(-6, 2, 97)``: 7 evenly spaced
  values first, then the best one's neighbours at distances 8, 4, 2, 1, keeping the first value with the
  highest validation top-1 accuracy; without one, the weight decay is 0.

It runs under :func:`torch.random.fork_rng`, so the caller's random state is left as it was.
"""

from __future__ import annotations

import math

import numpy as np
import torch

WEIGHT_DECAYS = np.logspace(-6, 2, num=97).tolist()
FIRST_PASS = list(range(0, len(WEIGHT_DECAYS), 16))  # the 7 values of logspace(-6, 2, 7)


def _loader(x: np.ndarray, y: np.ndarray, batch_size: int) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y, dtype=torch.long))
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)


def train(x: np.ndarray, y: np.ndarray, num_classes: int, weight_decay: float, lr: float, epochs: int,
          batch_size: int, seed: int, device: str = "cpu") -> torch.nn.Linear:
    """One probe: AdamW with a per-batch cosine learning rate (no warmup), cross-entropy."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    loader = _loader(x, y, batch_size)
    total = epochs * len(loader)
    for epoch in range(epochs):
        for i, (xb, yb) in enumerate(loader):
            step = i + epoch * len(loader)
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * (1 + math.cos(math.pi * step / total)) * lr
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            loss.backward()
            optimizer.step()
    return model


@torch.no_grad()
def logits(model: torch.nn.Linear, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    device = model.weight.device
    out = [model(torch.as_tensor(x[i:i + batch_size]).to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def _val_acc1(x_train, y_train, x_val, y_val, num_classes, wd, cfg, seed) -> float:
    model = train(x_train, y_train, num_classes, wd, cfg.sgd_lr, cfg.sgd_epochs, cfg.sgd_batch_size, seed,
                  cfg.sgd_device)
    return float((logits(model, x_val).argmax(1) == y_val).mean())


def search_weight_decay(x_train, y_train, x_val, y_val, num_classes: int, cfg, seed: int) -> tuple[float, dict]:
    """CLIP_benchmark's coarse-to-fine search: (best weight decay, {weight decay: validation top-1})."""
    scores: dict[float, float] = {}

    def peak(indices: list[int]) -> int:
        best, best_acc = 0, 0.0  # as CLIP_benchmark: index 0 unless some accuracy beats 0
        for idx in indices:
            wd = WEIGHT_DECAYS[idx]
            scores[wd] = _val_acc1(x_train, y_train, x_val, y_val, num_classes, wd, cfg, seed)
            if best_acc < scores[wd]:
                best, best_acc = idx, scores[wd]
        return best

    best = peak(FIRST_PASS)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
        span //= 2
    return WEIGHT_DECAYS[best], scores


def in_seed_order(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training features in CLIP_benchmark's order: a permutation drawn right after seeding."""
    torch.manual_seed(seed)
    perm = torch.randperm(len(y)).numpy()
    return x[perm], y[perm]


def probe_scores(x_train, y_train, x_val, y_val, x_test, num_classes: int, cfg, seed: int,
                 refit_with_val: bool) -> tuple[np.ndarray, dict]:
    """Test logits of the probe whose weight decay is searched on the validation split (0 without one),
    fit on the training features, plus the validation ones when ``refit_with_val`` (CLIP_benchmark does
    so for the full training set, not for k-shot subsets)."""
    with torch.random.fork_rng(devices=[]):
        x_train, y_train = in_seed_order(x_train, y_train, seed)
        if x_val is None:
            wd, per_wd, how = 0.0, {}, "none (no validation data), as CLIP_benchmark"
        else:
            wd, per_wd = search_weight_decay(x_train, y_train, x_val, y_val, num_classes, cfg, seed)
            how = "validation"
        if refit_with_val and x_val is not None:
            x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
        model = train(x_train, y_train, num_classes, wd, cfg.sgd_lr, cfg.sgd_epochs, cfg.sgd_batch_size, seed,
                      cfg.sgd_device)
        scores = logits(model, x_test)
    return scores, {"best_weight_decay": wd, "weight_decay_selection": how,
                    "val_acc1_by_weight_decay": {f"{k:.6g}": v for k, v in per_wd.items()}}
