"""The fine-tuning bench's dev protocol: settings are chosen on train-split patients, never on the test split."""

from __future__ import annotations

import json

from conftest import require_shared
from engine_helpers import load_bench

from medclip.evaluation.suites import load_suite
from medclip.training.config import load_recipe


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_dev_split_keeps_patients_apart_and_never_reads_the_test_split(tmp_path):
    covid = require_shared("covid-cxr")
    dev = load_bench("_finetune_dev.py")
    recipes, suite_path = dev.write_dev_split(tmp_path, ("full", "lit", "lora"))

    train, held = _rows(tmp_path / "train.jsonl"), _rows(tmp_path / "dev.jsonl")
    source = _rows(covid / "train.jsonl")
    assert len(train) + len(held) == len(source)
    assert not {r["patient_id"] for r in train} & {r["patient_id"] for r in held}
    assert 0.1 < len({r["patient_id"] for r in held}) / len({r["patient_id"] for r in source}) < 0.3
    test_images = {r["image"] for r in _rows(covid / "test.jsonl")}
    assert not {r["image"] for r in train + held} & {str(covid / i) for i in test_images}

    suite = load_suite(suite_path)
    for dataset in suite.datasets:  # every dataset scores dev rows; probes train on the split's train rows
        assert dataset.source.args["path"] == "dev.jsonl"
        if dataset.train is not None:
            assert dataset.train.args["path"] == "train.jsonl"
    for mode, path in recipes.items():
        recipe = load_recipe(str(path))
        assert recipe.data.build[0].input == str(tmp_path / "train.jsonl")
        assert recipe.eval.suites == [str(suite_path)]
        assert recipe.data.build[0].label_names == load_recipe(f"finetune_{mode}").data.build[0].label_names
