"""Evaluation: zero-shot classification, retrieval, linear probes, suites and reports."""

from typing import TYPE_CHECKING

from medclip import _lazy

if TYPE_CHECKING:  # imported on first use (medclip._lazy)
    from medclip.evaluation.datasets import READERS, EvalData, read_dataset, register_reader
    from medclip.evaluation.linear_probe import FeatureCache, ProbeConfig, linear_probe, linear_probe_features
    from medclip.evaluation.metrics import classification_metrics, multilabel_metrics, retrieval_metrics
    from medclip.evaluation.model import EmbedOptions, EvalModel, resolve_model
    from medclip.evaluation.retrieval import retrieval
    from medclip.evaluation.suites import DatasetSpec, Suite, load_suite
    from medclip.evaluation.zeroshot import ClassSpec, class_embeddings, zero_shot

__all__ = [
    "READERS", "ClassSpec", "DatasetSpec", "EmbedOptions", "EvalData", "EvalModel", "FeatureCache",
    "ProbeConfig", "Suite", "class_embeddings", "classification_metrics", "linear_probe",
    "linear_probe_features", "load_suite", "multilabel_metrics", "read_dataset", "register_reader",
    "resolve_model", "retrieval", "retrieval_metrics", "zero_shot",
]

_lazy.attach(__name__)
