"""The `demo` suite on a demo set built in tmp_path (medclip.data.demo), scored for medclip-tiny."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO_ROOT  # tests/ is on sys.path under pytest

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


def _class_embeddings(encoder, dataset: dict) -> torch.Tensor:
    """Prompt ensembling read straight from zero_shot/demo.yaml: mean of normalized prompt embeddings."""
    rows = []
    for entry in dataset["classes"]:
        prompts = entry["prompts"] if isinstance(entry, dict) else [t.format(c=entry) for t in dataset["templates"]]
        rows.append(F.normalize(encoder.encode_text(prompts).mean(0), dim=-1))
    return torch.stack(rows)


def _labels(entry) -> str:
    return entry["label"] if isinstance(entry, dict) else entry


@pytest.mark.integration
def test_eval_suite_demo_scores_tiny_model(demo_root, tiny_encoder, tmp_path):
    """The suite's numbers equal an independent computation from the split's images, labels and the YAML."""
    import medclip

    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    out = tmp_path / "out"
    code = main(["eval", "suite", "demo", "--root", str(demo_root), "--model", str(model_dir), "--out", str(out),
                 "--workers", "0", "--no-progress", "--no-plots", "--batch-size", "16", "--no-draft"])
    assert code == 0
    truth = list(iter_demo_split(demo_root, "val"))
    spec = {d["name"]: d for d in yaml.safe_load((REPO_ROOT / "zero_shot" / "demo.yaml").read_text())["datasets"]}
    images = tiny_encoder.encode_image([s.image for s in truth])
    for name, field in (("demo_modality", "modality"), ("demo_finding", "finding")):
        record = json.loads(next(out.glob(f"*/{name}.json")).read_text())
        assert record["suite"] == "demo" and record["task"] == "zeroshot_classification"
        assert record["n_samples"] == N_VAL and record["n_skipped"] == 0
        labels = [_labels(e) for e in spec[name]["classes"]]
        target = np.array([labels.index(s.labels[field]) for s in truth])
        predicted = (images @ _class_embeddings(tiny_encoder, spec[name]).T).argmax(1).numpy()
        matrix = np.zeros((len(labels), len(labels)), dtype=int)
        np.add.at(matrix, (target, predicted), 1)
        assert record["details"]["confusion_matrix"] == matrix.tolist()  # rows: true classes
        assert record["metrics"]["acc1"] == pytest.approx((predicted == target).mean())
        recalls = [matrix[c, c] / matrix[c].sum() for c in range(len(labels)) if matrix[c].sum()]
        assert record["metrics"]["mean_per_class_recall"] == pytest.approx(np.mean(recalls))
        assert record["headline"] == record["metrics"][spec[name]["headline"]]
    retrieval = json.loads(next(out.glob("*/demo_retrieval.json")).read_text())
    assert retrieval["n_samples"] == N_VAL and retrieval["details"]["n_texts"] == 3 * N_VAL
    assert retrieval["headline_metric"] == "image_retrieval_recall@5"
    texts = tiny_encoder.encode_text([c for s in truth for c in s.captions])
    owner = np.repeat(np.arange(N_VAL), 3)  # three captions per image, in order
    sims = (texts @ images.T).numpy()  # [texts, images]
    # Rank of a positive = 1 + items scoring strictly higher + items tying with it earlier in item order
    # (CLIP_benchmark's tie order; identical captions tie); a query counts its best positive.

    def rank(scores, item):
        return 1 + (scores > scores[item]).sum() + (scores[:item] == scores[item]).sum()

    image_rank = np.array([rank(sims[t], owner[t]) for t in range(len(owner))])
    text_rank = np.array([min(rank(sims[:, i], j) for j in np.flatnonzero(owner == i)) for i in range(N_VAL)])
    for k in (1, 5):
        assert retrieval["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx((image_rank <= k).mean())
        assert retrieval["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx((text_rank <= k).mean())
    assert retrieval["headline"] == retrieval["metrics"]["image_retrieval_recall@5"]
    assert "demo_finding [mean_per_class_recall]" in (out / "summary.md").read_text()


def test_eval_suite_demo_without_root_is_one_line_error(tmp_path, capsys):
    assert main(["eval", "suite", "demo", "--model", "medclip-tiny", "--out", str(tmp_path), "--no-progress"]) == 2
    assert "give --root" in capsys.readouterr().err
