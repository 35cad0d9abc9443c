"""The `demo` suite on a demo set built in tmp_path (medclip.data.demo), scored for medclip-tiny."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medclip.cli import main
from medclip.data.demo import FINDINGS, MODALITIES, build_demo, iter_demo_split
from medclip.evaluation import load_suite, read_dataset

N_VAL = 36


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    build_demo(root, n_train=6, n_val=N_VAL, image_size=64, shard_samples=20)  # two val shards
    return root


def test_demo_suite_reads_the_held_out_split_with_its_labels(demo_root):
    suite = load_suite("demo")
    assert suite.root is None  # the set lives wherever it was built: --root is required
    assert {d.name for d in suite.datasets} == {"demo_modality", "demo_finding", "demo_retrieval"}
    classes = {d.name: d.classes.labels for d in suite.datasets if d.classes}
    assert classes["demo_modality"] == list(MODALITIES) and classes["demo_finding"] == list(FINDINGS)
    spec = suite.select(["demo_modality"])[0]
    data = read_dataset(spec.source.reader, demo_root, **spec.source.args)
    truth = {s.key: s for s in iter_demo_split(demo_root, "val")}
    assert len(data) == N_VAL and set(data.keys) == set(truth)
    for key, labels, captions in zip(data.keys, data.labels, data.captions):
        assert {k: labels[k] for k in truth[key].labels} == truth[key].labels
        assert captions == truth[key].captions


def test_eval_suite_demo_scores_tiny_model(demo_root, tiny_encoder, tmp_path):
    import medclip

    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    out = tmp_path / "out"
    code = main(["eval", "suite", "demo", "--root", str(demo_root), "--model", str(model_dir), "--out", str(out),
                 "--workers", "0", "--no-progress", "--no-plots", "--batch-size", "16"])
    assert code == 0
    truth = list(iter_demo_split(demo_root, "val"))
    for name, field, classes in (("demo_modality", "modality", MODALITIES), ("demo_finding", "finding", FINDINGS)):
        record = json.loads(next(out.glob(f"*/{name}.json")).read_text())
        assert record["suite"] == "demo" and record["task"] == "zeroshot_classification"
        assert record["n_samples"] == N_VAL and record["n_skipped"] == 0
        counts = Counter(s.labels[field] for s in truth)
        matrix = record["details"]["confusion_matrix"]
        assert [sum(row) for row in matrix] == [counts.get(c, 0) for c in classes]  # rows: true classes
        assert 0.0 <= record["headline"] <= 1.0
    retrieval = json.loads(next(out.glob("*/demo_retrieval.json")).read_text())
    assert retrieval["n_samples"] == N_VAL and retrieval["details"]["n_texts"] == 3 * N_VAL
    assert retrieval["headline_metric"] == "image_retrieval_recall@5"
    assert 0.0 <= retrieval["metrics"]["image_retrieval_recall@1"] <= retrieval["headline"] <= 1.0
    assert "demo_finding [mean_per_class_recall]" in (out / "summary.md").read_text()


def test_eval_suite_demo_without_root_is_one_line_error(tmp_path, capsys):
    assert main(["eval", "suite", "demo", "--model", "medclip-tiny", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "give --root" in capsys.readouterr().err
