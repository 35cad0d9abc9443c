"""Tip-Adapter (training-free few-shot cache on the zero-shot classifier) in the linear probe's k-shot protocol."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import one_error_line  # tests/ is on sys.path under pytest

from medclip.cli import main
from medclip.evaluation import ProbeConfig, linear_probe_features


def _clusters(n_per_class: int, seed: int, classes: int = 4, dim: int = 32, noise: float = 0.6):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(7).standard_normal((classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + noise * rng.standard_normal((len(y), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y, centers


def _text_weights(centers: np.ndarray) -> np.ndarray:
    """Class text embeddings as a CLIP's: one shared direction plus a small class part, so the classes' cosines
    to an image differ by a few hundredths (a few logits at scale 100), not by the clusters' own spread."""
    shared = np.random.default_rng(3).standard_normal(centers.shape[1])
    unit = centers / np.linalg.norm(centers, axis=1, keepdims=True)
    return 0.1 * unit + shared / np.linalg.norm(shared)


def test_cache_corrects_a_wrong_zero_shot_classifier_and_leaves_a_right_one_alone():
    """Text weights that swap two classes: zero-shot fails on them, the 4-shot cache (alpha, beta chosen by
    leave-one-out on the shots) fixes it; with the true class directions the adapter stays as good."""
    x_train, y_train, centers = _clusters(30, 0)
    x_test, y_test, _ = _clusters(40, 1)
    swapped = _text_weights(centers[[1, 0, 2, 3]])
    cfg = ProbeConfig(method="tip-adapter", shots=(4,), fractions=(), seeds=(0, 1, 2))
    res = linear_probe_features(x_train, y_train, x_test, y_test, 4, cfg, text_weights=swapped)
    mean = res.settings["4-shot"]["mean"]
    assert mean["zs_mean_per_class_recall"] == pytest.approx(0.5, abs=0.05)  # two of four classes swapped
    assert mean["lp_mean_per_class_recall"] > 0.95
    runs = res.settings["4-shot"]["runs"]
    assert all(r["alpha_beta_selection"].startswith("leave-one-out") and r["alpha"] > 0 for r in runs)
    assert all(r["cache_size"] == 16 for r in runs)
    right = linear_probe_features(x_train, y_train, x_test, y_test, 4, cfg, text_weights=_text_weights(centers))
    assert right.settings["4-shot"]["mean"]["lp_mean_per_class_recall"] >= \
        right.settings["4-shot"]["mean"]["zs_mean_per_class_recall"] - 0.02


def test_adapter_and_probe_see_the_same_shots_per_seed(monkeypatch):
    """Same k-shot draws for every method: the cache holds exactly the samples the probe is fit on."""
    lp = importlib.import_module("medclip.evaluation.linear_probe")
    seen: dict[str, list] = {"sklearn": [], "tip-adapter": []}
    for method in seen:
        real = lp.PROBE_METHODS[method]

        def spy(x_train, *args, _real=real, _method=method, **kwargs):
            seen[_method].append(np.sort(x_train[:, 0]))
            return _real(x_train, *args, **kwargs)

        monkeypatch.setitem(lp.PROBE_METHODS, method, spy)
    x_train, y_train, centers = _clusters(30, 0)
    x_test, y_test, _ = _clusters(10, 1)
    for method in seen:
        cfg = ProbeConfig(method=method, shots=(1, 2, 4), fractions=(), seeds=(0, 1))
        linear_probe_features(x_train, y_train, x_test, y_test, 4, cfg, text_weights=centers)
    # sklearn holds a validation part out of the shots (2 and 4 shots): compare the 1-shot draws, where it
    # cannot, and check every adapter cache is k per class
    assert all(np.array_equal(a, b) for a, b in zip(seen["sklearn"][:2], seen["tip-adapter"][:2]))
    assert [len(s) for s in seen["tip-adapter"]] == [4, 4, 8, 8, 16, 16]


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    """One feature cache for this module's real-data tests: the MedPix features are computed once."""
    return tmp_path_factory.mktemp("features")


def test_eval_linear_probe_tip_adapter_on_real_data(tmp_path, tiny_encoder, shared_data, feature_cache):
    """The user's command, on the MedPix splits: k-shot settings with lp_* and zs_* keys, alpha and beta per run."""
    import medclip

    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    out = tmp_path / "out"
    code = main(["eval", "linear-probe", "--suite", "shared_real", "--dataset", "medpix_modality_probe",
                 "--model", str(model_dir), "--out", str(out), "--workers", "1", "--no-progress", "--no-plots",
                 "--cache-dir", str(feature_cache), "--probe-method", "tip-adapter",
                 "--shots", "1", "4", "--fractions", "--seeds", "0", "1"])
    assert code == 0
    record = json.loads(next(out.glob("*/medpix_modality_probe.json")).read_text())
    assert record["details"]["method"] == "tip-adapter" and record["task"] == "linear_probe"
    settings = record["details"]["settings"]
    assert set(settings) == {"1-shot", "4-shot"}
    for name in settings:
        assert {"lp_acc1", "lp_mean_per_class_recall", "zs_acc1", "zs_mean_per_class_recall"} <= \
            set(settings[name]["mean"])
    assert [r["alpha_beta_selection"] for r in settings["1-shot"]["runs"]] == ["default (a class has one "
                                                                              "training sample)"] * 2
    assert [r["cache_size"] for r in settings["4-shot"]["runs"]] == [8, 8]
    assert all(r["alpha_beta_selection"].startswith("leave-one-out") for r in settings["4-shot"]["runs"])
    assert record["headline_metric"] == "lp_mean_per_class_recall" and record["headline"] is not None


def test_suite_method_key_and_missing_prompts(tmp_path, tiny_encoder, shared_data, feature_cache):
    """A suite dataset can name its probe method; a method that needs prompts says so in one line."""
    import medclip

    model_dir = medclip.save(tiny_encoder, tmp_path / "model")
    suite = {"suite": "adapter", "root": str(shared_data), "datasets": [
        {"name": "modality_adapter", "task": "linear-probe", "method": "tip-adapter", "reader": "jsonl",
         "args": {"path": "medpix/dev.jsonl"}, "train": {"reader": "jsonl", "args": {"path": "medpix/train.jsonl"}},
         "label": "modality", "templates": ["a {c} image."], "classes": ["CT", "MRI"]},
        {"name": "no_prompts", "task": "linear-probe", "method": "tip-adapter", "reader": "jsonl",
         "args": {"path": "medpix/dev.jsonl"}, "train": {"reader": "jsonl", "args": {"path": "medpix/train.jsonl"}},
         "label": "modality", "classes": ["CT", "MRI"]}]}
    path = tmp_path / "adapter.yaml"
    path.write_text(yaml.safe_dump(suite))
    common = ["--model", str(model_dir), "--workers", "1", "--no-progress", "--no-plots",
              "--cache-dir", str(feature_cache), "--shots", "2", "--fractions", "--seeds", "0"]
    assert main(["eval", "suite", str(path), "--datasets", "modality_adapter", "--out", str(tmp_path / "a"),
                 *common]) == 0
    record = json.loads(next((tmp_path / "a").glob("*/modality_adapter.json")).read_text())
    assert record["details"]["method"] == "tip-adapter"
    assert main(["eval", "suite", str(path), "--datasets", "modality_adapter", "--out", str(tmp_path / "b"),
                 "--probe-method", "sklearn", *common]) == 0  # the command line wins
    record = json.loads(next((tmp_path / "b").glob("*/modality_adapter.json")).read_text())
    assert record["details"]["method"] == "sklearn"
    proc = subprocess.run([sys.executable, "-m", "medclip", "eval", "suite", str(path), "--datasets", "no_prompts",
                           "--out", str(tmp_path / "c"), *common], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "dataset no_prompts: probe method tip-adapter needs prompts for its classes" in one_error_line(proc.stderr)
