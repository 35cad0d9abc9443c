"""Linear probes on frozen image features.

Features are cached on disk under a key that hashes the model weights and preprocessing, the
data identity (file paths + sizes + mtimes, or content hashes of shard bytes) and the split
name, so any change to one of them computes fresh features instead of reusing stale ones.

Methods (``ProbeConfig.method``, a registry):

- ``sklearn`` (default): scikit-learn's L-BFGS logistic regression; C chosen by balanced accuracy on
  the validation split;
- ``clip_benchmark``: CLIP_benchmark's own procedure (AdamW-trained linear layer, weight decay
  searched by validation top-1), see :mod:`medclip.evaluation.probe_clip_benchmark`;
- ``tip-adapter``: no training, a cache of the shots added to the zero-shot classifier (it needs the
  classes' prompts), see :mod:`medclip.evaluation.tip_adapter`. Its records also carry the zero-shot
  classifier's scores on the same test samples (``zs_*``).

The validation split is given, or a stratified part of the training set. The probe is then refit on
train + validation for the full training set; k-shot and fraction subsets are fit on the subset only,
so a given validation split never adds samples to them. Few-shot settings (k per class, or a fraction
of the training set) run over several seeds and report mean and std.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split

from medclip.errors import MedclipError
from medclip.evaluation import probe_clip_benchmark, tip_adapter
from medclip.evaluation.datasets import EvalData
from medclip.evaluation.metrics import topk_accuracy
from medclip.evaluation.model import EmbedOptions, EvalModel

log = logging.getLogger(__name__)

DEFAULT_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def default_cache_dir() -> Path:
    base = os.environ.get("MEDCLIP_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return (Path(base) / "medclip" if base else Path.home() / ".cache" / "medclip") / "features"


def feature_cache_key(model_fingerprint: str, data_identity: str, split: str) -> str:
    h = hashlib.sha256()
    for part in (model_fingerprint, data_identity, split):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class FeatureCache:
    """Image features on disk, one file per (model, data, split) key."""

    def __init__(self, directory: Path | str | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def features(self, model: EvalModel, data: EvalData, split: str,
                 options: EmbedOptions | None = None) -> torch.Tensor:
        options = options or EmbedOptions()
        key = feature_cache_key(model.fingerprint(), data.identity() + "|" + options.transform_tag(), split)
        path = self.directory / f"{key}.pt"
        if path.is_file():
            try:
                cached = torch.load(path, map_location="cpu", weights_only=True)
                if isinstance(cached, torch.Tensor) and len(cached) == len(data):
                    self.hits += 1
                    return cached
            except Exception as exc:  # a truncated file from an interrupted run: recompute it
                log.warning("feature cache %s unreadable (%s); recomputing", path, exc)
        self.misses += 1
        feats = model.embed_images(data, options)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(feats, tmp)
        os.replace(tmp, path)
        return feats


@dataclass
class ProbeConfig:
    method: str = "sklearn"  # a key of PROBE_METHODS
    cs: tuple[float, ...] = DEFAULT_CS  # sklearn: the C values tried
    val_fraction: float = 0.2  # used only without a validation split
    max_iter: int = 1000  # sklearn
    seeds: tuple[int, ...] = (0, 1, 2)
    shots: tuple[int, ...] = ()  # k per class
    fractions: tuple[float, ...] = (1.0,)  # of the training set
    # clip_benchmark: CLIP_benchmark's defaults (--fewshot_lr, --fewshot_epochs, --batch_size)
    sgd_lr: float = 0.1
    sgd_epochs: int = 10
    sgd_batch_size: int = 64
    sgd_device: str = "cpu"

    def __post_init__(self):
        if self.method not in PROBE_METHODS:
            raise MedclipError(f"unknown linear-probe method {self.method!r}; known: {sorted(PROBE_METHODS)}")
        if not self.cs or any(c <= 0 for c in self.cs):
            raise MedclipError(f"linear-probe C values must be positive, got {self.cs}")
        if not 0 < self.val_fraction < 1:
            raise MedclipError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if any(not 0 < f <= 1 for f in self.fractions):
            raise MedclipError(f"fractions must be in (0, 1], got {self.fractions}")
        if any(k < 1 for k in self.shots):
            raise MedclipError(f"shots must be >= 1, got {self.shots}")


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    return clf.fit(x, y)


def _scores(clf: LogisticRegression, x: np.ndarray, num_classes: int) -> np.ndarray:
    """[N, num_classes] probabilities; classes absent from training get -inf."""
    out = np.full((len(x), num_classes), -np.inf)
    out[:, clf.classes_] = clf.predict_proba(x)
    return out


def probe_metrics(scores: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    logits = torch.from_numpy(scores).float()
    target = torch.from_numpy(y).long()
    if num_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, target, (1,)), float("nan")
    return {"lp_acc1": acc1, "lp_acc5": acc5,
            "lp_mean_per_class_recall": float(balanced_accuracy_score(y, scores.argmax(1)))}


def select_c(x_train, y_train, x_val, y_val, cfg: ProbeConfig, seed: int) -> tuple[float, dict[float, float]]:
    """The C with the best balanced accuracy on the validation split (ties -> stronger regularisation)."""
    results = {}
    for c in sorted(cfg.cs):
        clf = _fit(x_train, y_train, c, cfg.max_iter, seed)
        results[c] = float(balanced_accuracy_score(y_val, clf.predict(x_val)))
    best = max(results.values())
    return next(c for c in sorted(cfg.cs) if results[c] == best), results


def subsample(y: np.ndarray, rng: np.random.Generator, shots: int | None = None,
              fraction: float | None = None) -> np.ndarray:
    """Indices of k per class (all when a class has fewer) or a stratified fraction (>= 1 per class)."""
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        n = min(len(idx), shots) if shots is not None else max(1, round(len(idx) * fraction))
        picked.append(rng.choice(idx, size=n, replace=False))
    return np.sort(np.concatenate(picked))


def sklearn_probe_scores(x_train, y_train, x_val, y_val, x_test, num_classes: int, cfg: ProbeConfig, seed: int,
                         refit_with_val: bool) -> tuple[np.ndarray, dict]:
    """Test probabilities of scikit-learn's logistic regression with C chosen on validation."""
    if x_val is None:
        # 1-shot: nothing can be held out per class, so C cannot be validated; use the middle C.
        best_c = sorted(cfg.cs)[len(cfg.cs) // 2]
        clf = _fit(x_train, y_train, best_c, cfg.max_iter, seed)
        return _scores(clf, x_test, num_classes), {
            "best_c": best_c, "c_selection": "default (a class has one training sample)"}
    best_c, per_c = select_c(x_train, y_train, x_val, y_val, cfg, seed)
    if refit_with_val:
        x_train, y_train = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    clf = _fit(x_train, y_train, best_c, cfg.max_iter, seed)
    return _scores(clf, x_test, num_classes), {
        "best_c": best_c, "c_selection": "validation",
        "val_mean_per_class_recall_by_c": {str(c): v for c, v in per_c.items()}}


PROBE_METHODS = {"sklearn": sklearn_probe_scores, "clip_benchmark": probe_clip_benchmark.probe_scores,
                 "tip-adapter": tip_adapter.tip_adapter_scores}
# same data -> same probe (L-BFGS, the cache); the SGD probe depends on the seed
SEED_FREE_METHODS = {"sklearn", "tip-adapter"}
TEXT_METHODS = {"tip-adapter"}  # methods that start from the zero-shot classifier: they take text_weights
# methods that choose their settings on the training samples themselves (leave-one-out) when there is no
# validation split, instead of on a part held out of them
SELF_VALIDATING_METHODS = {"tip-adapter"}


def train_and_score(x_train, y_train, x_test, y_test, num_classes: int, cfg: ProbeConfig, seed: int,
                    x_val=None, y_val=None, refit_with_val: bool = True, text_weights=None) -> dict:
    """Choose the regularisation on validation, refit (on train + validation if ``refit_with_val``), score
    the test split. Without a validation split, one is held out of the training data (and always refit on).
    ``text_weights`` ([C, D] class text embeddings): the zero-shot classifier, for the methods that need it."""
    if len(np.unique(y_train)) < 2:
        raise MedclipError("linear probe needs at least two classes in the training data")
    extra = {}
    if cfg.method in TEXT_METHODS:
        if text_weights is None:
            raise MedclipError(f"probe method {cfg.method} needs the classes' text embeddings (their prompts)")
        extra["text_weights"] = text_weights
    if x_val is None and cfg.method not in SELF_VALIDATING_METHODS:
        refit_with_val = True  # the validation part is the training data's own
        counts = np.bincount(y_train)
        n_classes = int((counts > 0).sum())
        if counts[counts > 0].min() >= 2:
            n_val = min(len(y_train) - n_classes, max(n_classes, round(cfg.val_fraction * len(y_train))))
            x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=n_val,
                                                              random_state=seed, stratify=y_train)
    scores, details = PROBE_METHODS[cfg.method](x_train, y_train, x_val, y_val, x_test, num_classes, cfg, seed,
                                                refit_with_val, **extra)
    result = {**probe_metrics(scores, y_test, num_classes), "method": cfg.method, **details}
    if text_weights is not None:  # the zero-shot classifier on the same test samples, beside the method
        zs = probe_metrics(tip_adapter.zero_shot_scores(x_test, text_weights), y_test, num_classes)
        result.update({"zs" + k[2:]: v for k, v in zs.items()})
    return result


@dataclass
class ProbeResult:
    metrics: dict  # the full-data setting's metrics, plus "settings"
    settings: dict = field(default_factory=dict)  # setting name -> {"mean": {...}, "std": {...}, "runs": [...]}


def _mean_std(runs: list[dict]) -> tuple[dict, dict]:
    keys = [k for p in ("lp", "zs") for k in (f"{p}_acc1", f"{p}_acc5", f"{p}_mean_per_class_recall")
            if k in runs[0]]
    mean = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    std = {k: float(np.std([r[k] for r in runs])) for k in keys}
    return mean, std


def linear_probe_features(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                          num_classes: int, cfg: ProbeConfig | None = None,
                          x_val: np.ndarray | None = None, y_val: np.ndarray | None = None,
                          text_weights: np.ndarray | None = None) -> ProbeResult:
    """All configured settings on precomputed features. Few-shot subsets are drawn from the training split
    with the same generator per seed whatever the method, so every method of a seed sees the same shots."""
    cfg = cfg or ProbeConfig()
    settings = {}
    plans = [(f"{k}-shot", k, None) for k in cfg.shots] + \
            [(f"{round(f * 100, 3):g}%", None, f) for f in cfg.fractions]
    for name, shots, fraction in plans:
        runs = []
        for seed in cfg.seeds:
            rng = np.random.default_rng(seed)
            whole = fraction == 1.0
            idx = np.arange(len(y_train)) if whole else subsample(y_train, rng, shots, fraction)
            runs.append(train_and_score(x_train[idx], y_train[idx], x_test, y_test, num_classes, cfg, seed,
                                        x_val, y_val, refit_with_val=whole, text_weights=text_weights))
            validated_without_draws = x_val is not None or cfg.method in SELF_VALIDATING_METHODS
            if whole and validated_without_draws and cfg.method in SEED_FREE_METHODS:
                break  # nothing random left: same data, deterministic solver
        mean, std = _mean_std(runs)
        settings[name] = {"mean": mean, "std": std, "runs": runs}
    headline = settings.get("100%") or next(iter(settings.values()))
    metrics = dict(headline["mean"])
    metrics.update({f"{k}_std": v for k, v in headline["std"].items()})
    return ProbeResult(metrics, settings)


def linear_probe(model: EvalModel, train: EvalData, y_train: np.ndarray, test: EvalData, y_test: np.ndarray,
                 num_classes: int, cfg: ProbeConfig | None = None, cache: FeatureCache | None = None,
                 val: EvalData | None = None, y_val: np.ndarray | None = None,
                 options: EmbedOptions | None = None, text_weights: np.ndarray | None = None) -> ProbeResult:
    """Frozen features (cached) of each split, then :func:`linear_probe_features`."""
    cache = cache or FeatureCache()
    f_train = cache.features(model, train, "train", options).numpy()
    f_test = cache.features(model, test, "test", options).numpy()
    f_val = cache.features(model, val, "val", options).numpy() if val is not None else None
    return linear_probe_features(f_train, y_train, f_test, y_test, num_classes, cfg, f_val, y_val, text_weights)
