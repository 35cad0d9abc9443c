"""Benchmark suites: YAML files in ``zero_shot/`` naming datasets, readers, classes, prompts,
task and headline metric. A new dataset is a YAML entry, not code.

Schema (one file = one suite)::

    suite: shared_real
    root: ../../shared/data         # data root, relative to this file; `--root` overrides
    templates: ["a CT scan of the {c}."]   # suite-wide default templates (optional)
    datasets:
      - name: medpix_modality
        task: zero-shot             # zero-shot | multilabel | retrieval | linear-probe
        reader: jsonl               # a registered reader (image_folder, csv, jsonl, wds)
        args: {path: medpix/dev.jsonl}
        train: {reader: jsonl, args: {path: medpix/train.jsonl}}   # linear-probe only
        val:   {reader: ..., args: ...}                            # optional
        method: tip-adapter         # linear-probe only: a probe method (`--probe-method` overrides it)
        label: modality             # label field
        classes:                    # a label, or {label, name, prompts}
          - {label: CT, name: computed tomography, prompts: ["a CT scan."]}
          - MRI
        templates: [...]            # overrides the suite's
        separator: ", "             # multilabel: split a string label into several
        headline: acc1              # the metric this dataset reports
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from medclip import resources
from medclip.errors import MedclipError
from medclip.evaluation.zeroshot import ClassSpec

TASKS = ("zero-shot", "multilabel", "retrieval", "linear-probe")
# CLIP_benchmark's task names, used in the result files.
BENCHMARK_TASK = {"zero-shot": "zeroshot_classification", "multilabel": "zeroshot_classification",
                  "retrieval": "zeroshot_retrieval", "linear-probe": "linear_probe"}
HEADLINES = {
    "zero-shot": ("acc1", "acc5", "mean_per_class_recall", "macro_f1", "auc"),
    "multilabel": ("mean_average_precision", "auc"),
    "retrieval": tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)),
    "linear-probe": ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"),
}
DEFAULT_HEADLINE = {"zero-shot": "acc1", "multilabel": "mean_average_precision",
                    "retrieval": "image_retrieval_recall@5", "linear-probe": "lp_acc1"}
SUITES_DIR = resources.shipped_dir("suites")


@dataclass
class Source:
    reader: str
    args: dict = field(default_factory=dict)


@dataclass
class DatasetSpec:
    name: str
    task: str
    source: Source
    label: str | None = None
    classes: ClassSpec | None = None
    headline: str = ""
    separator: str | None = None
    train: Source | None = None
    val: Source | None = None
    probe_method: str | None = None  # linear-probe: the suite's method (None: the command line's)

    def __post_init__(self):
        if self.task not in TASKS:
            raise MedclipError(f"dataset {self.name}: unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        self.headline = self.headline or DEFAULT_HEADLINE[self.task]
        if self.headline not in HEADLINES[self.task]:
            raise MedclipError(f"dataset {self.name}: headline {self.headline!r} is not a {self.task} metric "
                               f"({', '.join(HEADLINES[self.task])})")
        if self.task != "retrieval" and (self.classes is None or not self.label):
            raise MedclipError(f"dataset {self.name}: task {self.task} needs `label` and `classes`")
        if self.task == "linear-probe" and self.train is None:
            raise MedclipError(f"dataset {self.name}: linear-probe needs a `train` source")
        if self.probe_method is not None:
            from medclip.evaluation.linear_probe import PROBE_METHODS

            if self.task != "linear-probe":
                raise MedclipError(f"dataset {self.name}: `method` is a linear-probe setting, not {self.task}")
            if self.probe_method not in PROBE_METHODS:
                raise MedclipError(f"dataset {self.name}: unknown probe method {self.probe_method!r}; "
                                   f"known: {', '.join(sorted(PROBE_METHODS))}")
        if self.task == "zero-shot" and self.headline == "acc5" and len(self.classes.labels) < 5:
            raise MedclipError(f"dataset {self.name}: acc5 needs at least 5 classes")

    @property
    def benchmark_task(self) -> str:
        return BENCHMARK_TASK[self.task]


@dataclass
class Suite:
    name: str
    root: Path | None
    datasets: list[DatasetSpec]
    path: Path | None = None

    def select(self, names: list[str] | None) -> list[DatasetSpec]:
        if not names:
            return self.datasets
        known = {d.name: d for d in self.datasets}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise MedclipError(f"suite {self.name} has no dataset {', '.join(unknown)}; it has {', '.join(known)}")
        return [known[n] for n in names]


def _source(raw, where: str) -> Source:
    if not isinstance(raw, dict) or "reader" not in raw:
        raise MedclipError(f"{where}: a data source needs `reader` (and `args`)")
    args = raw.get("args") or {}
    if not isinstance(args, dict):
        raise MedclipError(f"{where}: `args` must be a mapping")
    return Source(str(raw["reader"]), dict(args))


def parse_classes(raw, templates: list[str], where: str) -> ClassSpec:
    if not isinstance(raw, list) or not raw:
        raise MedclipError(f"{where}: `classes` must be a non-empty list")
    labels, names, prompts = [], [], {}
    for item in raw:
        if isinstance(item, dict):
            if "label" not in item:
                raise MedclipError(f"{where}: class entry {item} has no `label`")
            label = str(item["label"])
            names.append(str(item.get("name", label)))
            if item.get("prompts"):
                prompts[label] = [str(p) for p in item["prompts"]]
        else:
            label = str(item)
            names.append(label)
        labels.append(label)
    return ClassSpec(labels, names, list(templates), prompts)


def parse_dataset(raw: dict, suite_templates: list[str]) -> DatasetSpec:
    if not isinstance(raw, dict) or "name" not in raw:
        raise MedclipError(f"suite dataset entry {raw!r} has no `name`")
    name = str(raw["name"])
    where = f"dataset {name}"
    task = str(raw.get("task", "zero-shot"))
    templates = raw.get("templates", suite_templates) or []
    classes = parse_classes(raw["classes"], templates, where) if "classes" in raw else None
    return DatasetSpec(
        name=name, task=task, source=_source({"reader": raw.get("reader"), "args": raw.get("args")}, where),
        label=raw.get("label"), classes=classes, headline=str(raw.get("headline", "")),
        separator=raw.get("separator"),
        train=_source(raw["train"], where + " train") if raw.get("train") else None,
        val=_source(raw["val"], where + " val") if raw.get("val") else None,
        probe_method=str(raw["method"]) if raw.get("method") else None,
    )


def find_suite(name_or_path: str | Path) -> Path:
    return resources.resolve("suites", name_or_path)


def load_suite(name_or_path: str | Path) -> Suite:
    path = find_suite(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise MedclipError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("datasets"), list):
        raise MedclipError(f"{path}: a suite needs a `datasets` list")
    templates = raw.get("templates") or []
    datasets = [parse_dataset(d, templates) for d in raw["datasets"]]
    names = [d.name for d in datasets]
    if len(set(names)) != len(names):
        raise MedclipError(f"{path}: duplicate dataset names")
    root = raw.get("root")
    root_path = (path.parent / root).resolve() if root else None
    return Suite(str(raw.get("suite", path.stem)), root_path, datasets, path)
