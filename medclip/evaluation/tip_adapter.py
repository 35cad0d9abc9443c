"""Tip-Adapter (Zhang et al. 2022), the training-free variant: a key-value cache of the few-shot image
features mixed with the zero-shot classifier. A probe method (``--probe-method tip-adapter``), so it runs
the linear probe's k-shot protocol: the same shots per seed, the same ``lp_*`` report keys.

For test features ``f`` (L2-normalised), cache keys ``F`` (the shots' features), values ``L`` (their
one-hot labels) and class text embeddings ``W``::

    logits = 100 * f W^T + alpha * exp(-beta * (1 - f F^T)) L

The paper searches alpha and beta on a validation set. Here they are never chosen on the test split:
on the suite's validation split when it has one, else by leave-one-out on the cache itself (each shot
classified by the zero-shot classifier plus the cache without that shot), else — one shot of some
class, whose left-out shot would have no cache entry of its class — the paper's defaults (1, 5.5).
alpha = 0 is on the grid, so a cache that does not help falls back to the zero-shot classifier.
"""

from __future__ import annotations

import itertools

import numpy as np
from sklearn.metrics import balanced_accuracy_score

from medclip.evaluation.zeroshot import LOGIT_SCALE

DEFAULT_ALPHA, DEFAULT_BETA = 1.0, 5.5  # the paper's ImageNet defaults
# Up to 32: a weakly trained model's zero-shot logits can spread by tens at scale 100, where a cache capped at 8
# could not outvote them (on shared_real's COVID-19 views, leave-one-out chose 8, the edge of a 0-8 grid).
ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
BETAS = (1.0, 2.0, 3.5, 5.5, 7.5, 10.0)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cache_affinity(f: np.ndarray, keys: np.ndarray, beta: float) -> np.ndarray:
    """[N, K] exp(-beta (1 - cos)): 1 for an identical key, falling off with beta."""
    return np.exp(-beta * (1.0 - f @ keys.T))


def adapter_logits(f: np.ndarray, keys: np.ndarray, values: np.ndarray, text_weights: np.ndarray,
                   alpha: float, beta: float) -> np.ndarray:
    return LOGIT_SCALE * f @ text_weights.T + alpha * cache_affinity(f, keys, beta) @ values


def _one_hot(y: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float64)[y]


def _grid_search(score) -> tuple[float, float, dict[str, float]]:
    """The (alpha, beta) with the best balanced accuracy; ties go to the smaller alpha (nearer zero-shot)."""
    results = {(a, b): score(a, b) for a, b in itertools.product(ALPHAS, BETAS)}
    best = max(results.values())
    alpha, beta = next(ab for ab in sorted(results) if results[ab] == best)
    return alpha, beta, {f"{a:g},{b:g}": v for (a, b), v in results.items()}


def leave_one_out_search(x: np.ndarray, y: np.ndarray, text_weights: np.ndarray, num_classes: int):
    """alpha, beta chosen by classifying each shot with the cache of all the other shots."""
    zero_shot = LOGIT_SCALE * x @ text_weights.T
    values = _one_hot(y, num_classes)
    similarity = x @ x.T

    def score(alpha: float, beta: float) -> float:
        affinity = np.exp(-beta * (1.0 - similarity))
        np.fill_diagonal(affinity, 0.0)  # a shot never votes for itself
        return float(balanced_accuracy_score(y, (zero_shot + alpha * affinity @ values).argmax(1)))

    return _grid_search(score)


def validation_search(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                      text_weights: np.ndarray, num_classes: int):
    values = _one_hot(y, num_classes)
    return _grid_search(lambda a, b: float(balanced_accuracy_score(
        y_val, adapter_logits(x_val, x, values, text_weights, a, b).argmax(1))))


def tip_adapter_scores(x_train, y_train, x_val, y_val, x_test, num_classes: int, cfg, seed: int,
                       refit_with_val: bool, text_weights: np.ndarray) -> tuple[np.ndarray, dict]:
    """Test logits of Tip-Adapter (a probe method: same signature as the linear probes, plus the text weights).

    Deterministic: ``seed`` only picks the shots (upstream). ``refit_with_val``: the validation split joins
    the cache once alpha and beta are chosen on it (the full-training-set setting, as the probe refits).
    """
    x_train, x_test, text_weights = _unit(x_train), _unit(x_test), _unit(text_weights)
    if x_val is not None:
        x_val = _unit(x_val)
        alpha, beta, grid = validation_search(x_train, y_train, x_val, y_val, text_weights, num_classes)
        selection = "validation"
        if refit_with_val:
            x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    elif np.bincount(y_train)[np.unique(y_train)].min() >= 2:
        alpha, beta, grid = leave_one_out_search(x_train, y_train, text_weights, num_classes)
        selection = "leave-one-out on the shots"
    else:
        alpha, beta, grid = DEFAULT_ALPHA, DEFAULT_BETA, {}
        selection = "default (a class has one training sample)"
    logits = adapter_logits(x_test, x_train, _one_hot(y_train, num_classes), text_weights, alpha, beta)
    details = {"alpha": alpha, "beta": beta, "alpha_beta_selection": selection, "cache_size": len(y_train)}
    if grid:
        details["selection_mean_per_class_recall_by_alpha_beta"] = grid
    return logits, details


def zero_shot_scores(x_test: np.ndarray, text_weights: np.ndarray) -> np.ndarray:
    """The classifier the cache is added to, alone (the adapter at alpha = 0)."""
    return LOGIT_SCALE * _unit(x_test) @ _unit(text_weights).T
