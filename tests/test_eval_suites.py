"""Readers, suites, blocked retrieval ranks, prompt ensembling and the `medclip eval` command."""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medclip.cli import main
from medclip.errors import MedclipError
from medclip.evaluation import ClassSpec, EvalModel, class_embeddings, load_suite, read_dataset
from medclip.evaluation.metrics import classification_metrics, retrieval_metrics
from medclip.evaluation.suites import SUITES_DIR, parse_dataset
from medclip.evaluation.zeroshot import build_targets


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(path)


def test_readers_agree_on_labels(tmp_path):
    _png(tmp_path / "folder" / "CT" / "a.png", 10)
    _png(tmp_path / "folder" / "MRI" / "b.png", 200)
    folder = read_dataset("image_folder", tmp_path, path="folder")
    assert [r["label"] for r in folder.labels] == ["CT", "MRI"]
    with open(tmp_path / "set.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "modality"], ["folder/CT/a.png", "CT"], ["folder/MRI/b.png", "MRI"]])
    table = read_dataset("csv", tmp_path, path="set.csv")
    assert [r["modality"] for r in table.labels] == ["CT", "MRI"]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps({"image": f"folder/{m}/{n}.png", "modality": m,
                                                               "caption": c}) for m, n, c in
                                                   [("CT", "a", "a ct"), ("MRI", "b", "")]))
    lines = read_dataset("jsonl", tmp_path, path="set.jsonl")
    assert lines.captions == [["a ct"], []]  # an empty caption is no caption
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="PNG")
    with tarfile.open(tmp_path / "shard-000.tar", "w") as tar:
        for name, payload in [("k1.png", buf.getvalue()),
                              ("k1.json", json.dumps({"captions": ["x", "y"], "labels": {"modality": "CT"}}).encode())]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    shards = read_dataset("wds", tmp_path, path="shard-*.tar")
    assert shards.labels[0]["modality"] == "CT" and shards.captions == [["x", "y"]]
    with pytest.raises(MedclipError, match="unknown dataset reader"):
        read_dataset("parquet", tmp_path)
    with pytest.raises(MedclipError, match="not found"):
        read_dataset("jsonl", tmp_path, path="missing.jsonl")


def test_targets_skip_and_count_unknown_labels(tmp_path):
    _png(tmp_path / "x.png", 1)
    rows = [{"image": "x.png", "finding": f} for f in ("COVID-19", "todo", "", "SARS", "COVID-19, ARDS")]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = read_dataset("jsonl", tmp_path, path="t.jsonl")
    spec = ClassSpec(["COVID-19", "SARS", "ARDS"], templates=["{c}"])
    single = build_targets(data, "finding", spec)
    assert single.indices == [0, 3] and single.skipped == 3 and single.target.tolist() == [0, 1]
    multi = build_targets(data, "finding", spec, multilabel=True, separator=",")
    assert multi.target[4].tolist() == [1, 0, 1] and multi.target[1].tolist() == [0, 0, 0]


def test_prompt_ensemble_is_renormalized_mean(tiny_encoder):
    model = EvalModel(tiny_encoder)
    spec = ClassSpec(["a", "b"], names=["lung", "liver"], templates=["a scan of the {c}.", "{c} tissue."],
                     prompts={"b": ["only this sentence."]})
    emb = class_embeddings(model, spec)
    manual_a = F.normalize(tiny_encoder.encode_text(["a scan of the lung.", "lung tissue."]).mean(0), dim=0)
    assert torch.allclose(emb[0], manual_a, atol=1e-5)
    assert torch.allclose(emb[1], tiny_encoder.encode_text(["only this sentence."])[0], atol=1e-5)


def test_retrieval_ranks_known_answer_and_block_invariance():
    images = torch.eye(4)
    texts = torch.stack([images[0], images[1], images[3], images[2], 0.9 * images[0] + 0.1 * images[2]])
    texts = F.normalize(texts, dim=-1)
    owner = torch.tensor([0, 1, 2, 3, 2])  # texts 2 and 3 are swapped; text 4 belongs to image 2
    full = retrieval_metrics(images, texts, owner, (1, 2))
    assert full["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    # texts 2 and 3 score 0 with their own image and with images 0 and 1, which come first: rank 4
    assert full["image_retrieval_mean_rank"] == pytest.approx((1 + 1 + 4 + 4 + 2) / 5)
    assert full["text_retrieval_recall@1"] == pytest.approx(2 / 4)  # image 2's best positive is text 4: rank 2
    small = retrieval_metrics(images, texts, owner, (1, 2), max_elements=5)
    assert small == full


def test_auc_and_f1_known_answer():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.2, 0.1]])
    target = torch.tensor([0, 1, 1, 0])
    m = classification_metrics(logits, target, 2)
    assert m["acc1"] == pytest.approx(0.75)
    # p1 = sigmoid(l1 - l0): positives 0.38, 0.73; negatives 0.12, 0.48 -> 3 of 4 pairs ordered
    assert m["auc"] == pytest.approx(0.75)
    assert m["confusion_matrix"] == [[2, 0], [1, 1]]


def test_every_suite_yaml_parses_with_declared_headlines():
    names = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    assert "shared_real" in names and "unimed21" in names
    for name in names:
        suite = load_suite(name)
        assert suite.datasets and all(d.headline for d in suite.datasets)
    unimed = load_suite("unimed21")
    assert len(unimed.datasets) == 21
    auc_sets = {d.name for d in unimed.datasets if d.headline == "auc"}
    assert auc_sets == {"acl_mri", "meniscal_mri", "thyroid_us", "breast_us", "refuge_retina"}


def test_bad_suite_entries_are_one_line_errors():
    base = {"name": "x", "reader": "jsonl", "args": {"path": "a.jsonl"}, "label": "m", "classes": ["A", "B"]}
    with pytest.raises(MedclipError, match="headline"):
        parse_dataset({**base, "headline": "mean_average_precision"}, ["{c}"])
    with pytest.raises(MedclipError, match="acc5"):
        parse_dataset({**base, "headline": "acc5"}, ["{c}"])
    with pytest.raises(MedclipError, match="unknown task"):
        parse_dataset({**base, "task": "segmentation"}, ["{c}"])
    with pytest.raises(MedclipError, match="placeholder"):
        parse_dataset(base, ["no placeholder"])


def test_eval_suite_shared_real_writes_json_table_and_plots(tmp_path, tiny_encoder, shared_data):
    import medclip

    assert (shared_data / "medpix" / "dev.jsonl").is_file()
    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    out = tmp_path / "out"
    code = main(["eval", "suite", "shared_real", "--model", str(model_dir), "--out", str(out), "--workers", "0",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--seeds", "0",
                 "--datasets", "medpix_modality", "covid_view", "covid_retrieval"])
    assert code == 0
    record = json.loads(next(out.glob("*/medpix_modality.json")).read_text())
    assert record["task"] == "zeroshot_classification" and record["headline_metric"] == "mean_per_class_recall"
    assert {"acc1", "acc5", "mean_per_class_recall", "auc"} <= set(record["metrics"])
    assert record["metrics"]["acc5"] is None and record["n_samples"] == 197
    ret = json.loads(next(out.glob("*/covid_retrieval.json")).read_text())
    assert ret["n_skipped"] == 20 and "image_retrieval_recall@5" in ret["metrics"]  # empty captions skipped
    view = json.loads(next(out.glob("*/covid_view.json")).read_text())
    assert view["n_skipped"] > 0 and len(view["details"]["confusion_matrix"]) == 6
    table = (out / "summary.md").read_text()
    assert "medpix_modality [mean_per_class_recall]" in table and "covid_retrieval [image_retrieval_recall@5]" in table
    assert (out / "summary.csv").is_file()
    assert (out / "plots" / "bars_medpix_modality.png").stat().st_size > 0
    assert list((out / "plots").glob("confusion_*covid_view.png"))


def test_eval_cli_bad_input_is_one_line_error(tmp_path, capsys):
    assert main(["eval", "suite", "no_such_suite", "--model", "medclip-tiny", "--out", str(tmp_path)]) == 2
    assert "medclip: error: unknown suite" in capsys.readouterr().err
