"""Concept zero-shot scored against concept labels: AUC per concept, from the library and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_concepts_grounding import write_boxed_shard  # tests/ is on sys.path under pytest

from medclip.cli import main as cli_main
from medclip.concepts import zero_shot
from medclip.concepts.zero_shot import (
    ConceptLabelRecord,
    concept_label_records_from_shards,
    evaluate_concept_zero_shot,
    present_concepts,
)
from medclip.errors import MedclipError


def test_present_concepts_are_the_non_negated_mentions():
    record = {"concepts": [{"name": "nodule", "cui": "C1"}, {"name": "mass", "cui": "C2", "negated": True},
                           {"cui": "C3"}]}
    assert present_concepts(record) == {"nodule", "C3"}
    assert present_concepts({"concepts": []}) == frozenset()  # labelled: shows none of the concepts
    assert present_concepts({"captions": ["x"]}) is None  # unlabelled


def test_auc_per_concept_by_hand(monkeypatch):
    records = [ConceptLabelRecord(None, frozenset(p)) for p in (["a"], ["a", "b"], [], ["b"])]
    planted = torch.tensor([[0.9, 0.2, 0.5], [0.8, 0.6, 0.5], [0.1, 0.3, 0.5], [0.85, 0.7, 0.5]])
    monkeypatch.setattr(zero_shot, "concept_scores",
                        lambda encoder, images, names, *args: (planted[:, :len(names)], "pc_align"))
    result = evaluate_concept_zero_shot(None, records, ["a", "b", "c"])
    # a: positives 0.9, 0.8 vs negatives 0.1, 0.85 -> 3 of 4 pairs ordered; b: 4 of 4; c: no positive.
    assert result.per_concept == {"a": {"auc": 0.75, "positives": 2}, "b": {"auc": 1.0, "positives": 2},
                                  "c": {"auc": None, "positives": 0}}
    assert result.mean_auc == pytest.approx(0.875) and result.n_images == 4 and result.method == "pc_align"
    default = evaluate_concept_zero_shot(None, records)  # every concept present somewhere, sorted
    assert list(default.per_concept) == ["a", "b"]
    with pytest.raises(MedclipError, match="no concept has both"):
        evaluate_concept_zero_shot(None, records, ["c"])


def _labelled_shard(path):
    rng = np.random.default_rng(0)
    present = [["nodule"], ["nodule", "mass"], [], ["mass"], ["nodule"], []]
    samples = []
    for i, names in enumerate(present):
        image = Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8))
        concepts = [{"name": n, "cui": n.upper()} for n in names] + [{"name": "cyst", "cui": "C", "negated": True}]
        samples.append((f"s{i}", image, {"concepts": concepts}))
    samples.append(("unlabelled", image, {"captions": ["no concept field"]}))
    write_boxed_shard(path, samples)
    return present


def test_cli_scores_shard_labels_like_an_independent_computation(tiny_encoder, tmp_path, caplog):
    import medclip

    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    present = _labelled_shard(tmp_path / "labels.tar")
    records = concept_label_records_from_shards([tmp_path / "labels.tar"])
    assert [sorted(r.present) for r in records] == [sorted(p) for p in present]
    assert "1 sample(s) without concept labels" in caplog.text
    out = tmp_path / "auc.json"
    assert cli_main(["concepts", "zero-shot", "--shards", str(tmp_path / "labels.tar"), "--model", str(model_dir),
                     "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "cosine" and result["n_images"] == 6  # no heads: image-text cosine
    images = tiny_encoder.encode_image([r.image for r in records])
    names = ["mass", "nodule"]
    scores = (images @ tiny_encoder.encode_text(names).T).numpy()
    for c, name in enumerate(names):
        labels = [name in p for p in present]
        assert result["per_concept"][name]["auc"] == pytest.approx(roc_auc_score(labels, scores[:, c]))
    assert set(result["per_concept"]) == {"mass", "nodule"}  # the negated "cyst" is never present


def test_cli_zero_shot_needs_images_or_shards(tmp_path, capsys):
    assert cli_main(["concepts", "zero-shot", "--model", "medclip-tiny", "--concepts", "a"]) == 2
    assert "give image files" in capsys.readouterr().err
    assert cli_main(["concepts", "zero-shot", "--shards", str(tmp_path / "none.tar"), "--model", "medclip-tiny"]) == 2
    assert "no such shard" in capsys.readouterr().err
