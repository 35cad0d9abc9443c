"""Runs suite entries for a model and returns CLIP_benchmark-format result records."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from medclip import jsonio
from medclip.errors import MedclipError
from medclip.evaluation.datasets import EvalData, read_dataset
from medclip.evaluation.linear_probe import TEXT_METHODS, FeatureCache, ProbeConfig, linear_probe
from medclip.evaluation.model import EmbedOptions, EvalModel
from medclip.evaluation.retrieval import retrieval
from medclip.evaluation.suites import DatasetSpec, Source
from medclip.evaluation.zeroshot import build_targets, class_embeddings, zero_shot

log = logging.getLogger(__name__)

# Lists and matrices live beside the scalar metrics, so "metrics" stays a flat table row.
DETAIL_KEYS = ("per_class_auc", "per_class_average_precision", "confusion_matrix")

# Why a metric can be undefined (NaN in CLIP_benchmark); the record says it beside the null value.
UNDEFINED_REASONS = {
    "acc5": "fewer than 5 classes",
    "lp_acc5": "fewer than 5 classes",
    "auc": "no class has both positive and negative samples",
    "per_class_auc": "the class needs both positive and negative samples (it is absent from the labels, "
                     "or every sample has it)",
}


@dataclass
class RunOptions:
    embed: EmbedOptions
    probe: ProbeConfig
    cache: FeatureCache | None = None
    recall_ks: tuple[int, ...] = (1, 5, 10)
    probe_method_given: bool = False  # the command line named the probe method: it wins over a suite's `method`

# What each probe run chose (its regularisation, Tip-Adapter's alpha and beta), kept per run in the record.
RUN_CHOICES = ("best_c", "c_selection", "alpha", "beta", "alpha_beta_selection", "cache_size")


def _read(source: Source, root: Path | None, name: str) -> EvalData:
    if root is None:
        raise MedclipError(f"dataset {name}: no data root (give --root)")
    return read_dataset(source.reader, root, name=name, **source.args)


def undefined_metrics(record: dict) -> dict[str, str]:
    """``{"metrics.acc5": reason, "details.per_class_auc.<class>": reason}`` for each NaN / inf value."""
    names = record.get("classnames") or []
    out = {}
    for path in jsonio.non_finite_paths(record):
        metric = re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]
        index = re.search(r"\[(\d+)\]$", path)
        if index and metric in ("per_class_auc", "per_class_average_precision") and int(index[1]) < len(names):
            path = f"{path[:index.start()]}.{names[int(index[1])]}"
        out[path] = UNDEFINED_REASONS.get(metric, "not defined on this data")
    return out


def probe_config(spec: DatasetSpec, options: RunOptions) -> ProbeConfig:
    """The run's probe settings, with the dataset's own `method` unless the command line chose one."""
    if spec.probe_method and not options.probe_method_given:
        return dataclasses.replace(options.probe, method=spec.probe_method)
    return options.probe


def probe_text_weights(model: EvalModel, spec: DatasetSpec, method: str):
    """[C, D] class text embeddings for a method that starts from the zero-shot classifier, else None."""
    if method not in TEXT_METHODS:
        return None
    try:
        return class_embeddings(model, spec.classes).numpy()
    except MedclipError as exc:
        raise MedclipError(f"dataset {spec.name}: probe method {method} needs prompts for its classes "
                           f"(`templates` or per-class `prompts` in the suite): {exc}") from None


def evaluate_dataset(model: EvalModel, spec: DatasetSpec, root: Path | None, options: RunOptions,
                     suite: str = "") -> dict:
    """One dataset, one model -> a result record (CLIP_benchmark keys plus headline and details)."""
    data = _read(spec.source, root, spec.name)
    details: dict = {}
    if spec.task in ("zero-shot", "multilabel"):
        res = zero_shot(model, data, spec.label, spec.classes, multilabel=spec.task == "multilabel",
                        separator=spec.separator, options=options.embed)
        metrics, n, skipped = res.metrics, res.n_samples, res.n_skipped
    elif spec.task == "retrieval":
        res = retrieval(model, data, options.recall_ks, options.embed)
        metrics, n, skipped = res.metrics, res.n_images, res.n_skipped
        details["n_texts"] = res.n_texts
    else:
        train = _read(spec.train, root, spec.name + ":train")
        val = _read(spec.val, root, spec.name + ":val") if spec.val else None
        tr = build_targets(train, spec.label, spec.classes)
        te = build_targets(data, spec.label, spec.classes)
        va = build_targets(val, spec.label, spec.classes) if val is not None else None
        cfg = probe_config(spec, options)
        res = linear_probe(model, train.subset(tr.indices), tr.target.numpy(), data.subset(te.indices),
                           te.target.numpy(), len(spec.classes.labels), cfg, options.cache,
                           val.subset(va.indices) if va else None, va.target.numpy() if va else None,
                           options.embed, probe_text_weights(model, spec, cfg.method))
        metrics, n, skipped = res.metrics, len(te.indices), te.skipped
        details["method"] = cfg.method
        details["settings"] = {k: {"mean": v["mean"], "std": v["std"],
                                   "runs": [{c: r[c] for c in RUN_CHOICES if c in r} for r in v["runs"]]}
                               for k, v in res.settings.items()}
        details["n_train"] = len(tr.indices)
    if data.bad_samples:
        details["bad_samples"] = dict(data.bad_samples)  # met while reading the data files (the log names them)
        skipped += data.dropped
    for key in DETAIL_KEYS:
        if key in metrics:
            details[key] = metrics.pop(key)
    record = {
        "dataset": spec.name,
        "model": model.name,
        "pretrained": "",
        "task": spec.benchmark_task,
        "metrics": {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        "language": "en",
        "suite": suite,
        "headline_metric": spec.headline,
        "headline": metrics.get(spec.headline),
        "n_samples": n,
        "n_skipped": skipped,
        "details": details,
    }
    if spec.classes is not None:
        record["classnames"] = spec.classes.names
    # JSON has no NaN: undefined values become null (CLIP_benchmark's NaN acc5 too), with the reason.
    record["undefined"] = undefined_metrics(record)
    return jsonio.finite(record)


