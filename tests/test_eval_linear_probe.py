"""Linear probe: recovers a known answer; its feature cache never serves stale features."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from medclip.errors import MedclipError
from medclip.evaluation import EvalModel, FeatureCache, ProbeConfig, linear_probe_features, read_dataset
from medclip.evaluation.linear_probe import subsample


def _blobs(n_per_class: int, seed: int, noise: float = 0.3):
    """Three classes along orthogonal directions in 16-d: a linear probe separates them exactly."""
    rng = np.random.default_rng(seed)
    centers = np.eye(16)[:3] * 3.0
    y = np.repeat(np.arange(3), n_per_class)
    x = centers[y] + noise * rng.standard_normal((len(y), 16))
    return x.astype(np.float32), y


def test_probe_recovers_separable_classes_and_reports_settings():
    x_train, y_train = _blobs(40, 0)
    x_test, y_test = _blobs(30, 1)
    cfg = ProbeConfig(shots=(2,), fractions=(0.1, 1.0), seeds=(0, 1))
    res = linear_probe_features(x_train, y_train, x_test, y_test, 3, cfg)
    assert res.metrics["lp_acc1"] == pytest.approx(1.0)
    assert res.metrics["lp_mean_per_class_recall"] == pytest.approx(1.0)
    assert np.isnan(res.metrics["lp_acc5"])  # fewer than 5 classes
    assert set(res.settings) == {"2-shot", "10%", "100%"}
    assert len(res.settings["2-shot"]["runs"]) == 2
    assert "lp_acc1" in res.settings["10%"]["std"]


def test_probe_chance_level_on_random_labels():
    x_train, _ = _blobs(40, 0)
    x_test, _ = _blobs(40, 1)
    rng = np.random.default_rng(5)
    res = linear_probe_features(x_train, rng.integers(0, 3, len(x_train)), x_test, rng.integers(0, 3, len(x_test)),
                                3, ProbeConfig(seeds=(0,)))
    assert res.metrics["lp_acc1"] < 0.6


def test_c_is_the_best_on_validation_and_one_shot_still_runs():
    x_train, y_train = _blobs(20, 0, noise=2.0)
    x_test, y_test = _blobs(20, 1, noise=2.0)
    x_val, y_val = _blobs(10, 2, noise=2.0)
    res = linear_probe_features(x_train, y_train, x_test, y_test, 3, ProbeConfig(cs=(1e-4, 1e-1, 1e3), seeds=(0,)),
                                x_val, y_val)
    run = res.settings["100%"]["runs"][0]
    by_c = run["val_mean_per_class_recall_by_c"]
    assert set(by_c) == {"0.0001", "0.1", "1000.0"}
    assert by_c[str(run["best_c"])] == max(by_c.values())
    one = linear_probe_features(x_train, y_train, x_test, y_test, 3, ProbeConfig(shots=(1,), fractions=(), seeds=(0,)))
    assert one.settings["1-shot"]["runs"][0]["c_selection"].startswith("default")


def test_subsample_k_per_class_and_fraction():
    y = np.repeat(np.arange(3), [10, 20, 30])
    idx = subsample(y, np.random.default_rng(0), shots=4)
    assert np.bincount(y[idx]).tolist() == [4, 4, 4]
    idx = subsample(y, np.random.default_rng(0), fraction=0.1)
    assert np.bincount(y[idx]).tolist() == [1, 2, 3]
    with pytest.raises(MedclipError):
        ProbeConfig(fractions=(0.0,))


def test_feature_cache_invalidated_when_split_or_data_changes(tmp_path, tiny_encoder):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32, 3), 40 * i + (100 if c == "b" else 0), np.uint8)).save(root / c / f"{i}.png")
    model = EvalModel(tiny_encoder)
    cache = FeatureCache(tmp_path / "cache")
    data = read_dataset("image_folder", root)
    first = cache.features(model, data, "train")
    again = cache.features(model, data, "train")
    assert (cache.misses, cache.hits) == (1, 1) and torch.equal(first, again)
    cache.features(model, data, "test")  # another split name: its own entry
    assert cache.misses == 2
    cache.features(model, data.subset([0, 1, 2, 3]), "train")  # the split's membership changed
    assert cache.misses == 3
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(root / "a" / "0.png")  # a file changed in place
    changed = cache.features(model, read_dataset("image_folder", root), "train")
    assert cache.misses == 4 and not torch.equal(changed, first)
