"""A patient-level dev split of the COVID-19 train table, for choosing fine-tuning settings without the test split.

``write_dev_split`` puts a seeded fifth of the train table's patients (all their images) into ``dev.jsonl`` and
the rest into ``train.jsonl``, and writes beside them, for each fine-tuning recipe, a copy that trains on
``train.jsonl`` and is evaluated on ``dev.jsonl`` (the ``covid`` suite with its tables swapped). The test split
is read by nothing here. Image paths are written absolute, so the tables work from any folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
COVID = REPO.parent / "shared" / "data" / "covid-cxr"
DEV_SHARE = 0.2


def _split_rows(rows: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    patients = sorted({str(r["patient_id"]) for r in rows})
    random.Random(seed).shuffle(patients)
    dev_patients = set(patients[:round(DEV_SHARE * len(patients))])
    return ([r for r in rows if str(r["patient_id"]) not in dev_patients],
            [r for r in rows if str(r["patient_id"]) in dev_patients])


def _write_table(path: Path, rows: list[dict]) -> None:
    """Written only when its content changes: the recipe's data.build reuses shards while the table's mtime stays."""
    text = "".join(json.dumps({**r, "image": str(COVID / r["image"])}) + "\n" for r in rows)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def _dev_suite(folder: Path) -> Path:
    """zero_shot/covid.yaml evaluated on dev.jsonl, its probes trained on train.jsonl."""
    suite = yaml.safe_load((REPO / "zero_shot" / "covid.yaml").read_text())
    suite.update(suite="covid_dev", root=str(folder.resolve()))
    for dataset in suite["datasets"]:
        dataset["args"] = {**dataset["args"], "path": "dev.jsonl"}
        if "train" in dataset:
            dataset["train"] = {**dataset["train"], "args": {**dataset["train"]["args"], "path": "train.jsonl"}}
    path = folder / "covid_dev.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def _dev_recipe(folder: Path, mode: str, suite: Path) -> Path:
    recipe = yaml.safe_load((REPO / "pretrain" / f"finetune_{mode}.yaml").read_text())
    (build,) = recipe["data"]["build"]
    build["input"] = str((folder / "train.jsonl").resolve())
    recipe["eval"]["suites"] = [str(suite)]
    path = folder / f"finetune_{mode}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_dev_split(folder: Path, modes: tuple[str, ...], seed: int = 0) -> tuple[dict[str, Path], Path]:
    """({mode: recipe path}, suite path) of the dev protocol, written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (COVID / "train.jsonl").read_text().splitlines() if line.strip()]
    train, dev = _split_rows(rows, seed)
    _write_table(folder / "train.jsonl", train)
    _write_table(folder / "dev.jsonl", dev)
    suite = _dev_suite(folder)
    print(f"dev split (seed {seed}): {len(train)} train / {len(dev)} dev images, patients kept apart", flush=True)
    return {mode: _dev_recipe(folder, mode, suite) for mode in modes}, suite
