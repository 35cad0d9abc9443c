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


def _features(n_per_class: int, seed: int, classes: int = 8, dim: int = 32, noise: float = 2.0):
    """L2-normalised features of overlapping classes (as the encoders give): the probe's regularisation matters."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(99).standard_normal((classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centers[y] + noise * rng.standard_normal((len(y), dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), y


@pytest.fixture
def one_thread():
    """Tiny probe layers gain nothing from intra-op threads, and lose a lot to them on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _clip_benchmark_on_cpu(monkeypatch):
    """CLIP_benchmark's linear probe insists on CUDA: its .cuda() / .to("cuda") calls become no-ops on the CPU."""
    import builtins

    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self if a[:1] == ("cuda",) else to(self, *a, **k))
    # its accuracy() calls float() on a 1-element array, a TypeError under numpy >= 2.4
    monkeypatch.setattr(zeroshot_classification, "float",
                        lambda v: builtins.float(np.asarray(v).reshape(-1)[0]), raising=False)


def test_clip_benchmark_method_equals_clip_benchmarks_own_evaluate(tmp_path, monkeypatch, one_thread):
    """Same cached features through CLIP_benchmark 1.6's linear_probe.evaluate and medclip's method."""
    from clip_benchmark.metrics import linear_probe as cb

    x_train, y_train = _features(20, 0)
    x_val, y_val = _features(10, 1)
    x_test, y_test = _features(25, 2)
    seed = 3
    cfg = ProbeConfig(method="clip_benchmark", seeds=(seed,), sgd_epochs=4, sgd_batch_size=32)
    ours = linear_probe_features(x_train, y_train, x_test, y_test, 8, cfg, x_val, y_val)
    run = ours.settings["100%"]["runs"][0]

    feature_dir = tmp_path / "features" / "model"
    feature_dir.mkdir(parents=True)
    for split, (x, y) in {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}.items():
        torch.save(torch.from_numpy(x), feature_dir / f"features_{split}.pt")
        torch.save(torch.from_numpy(y), feature_dir / f"targets_{split}.pt")
    _clip_benchmark_on_cpu(monkeypatch)
    torch.manual_seed(seed)  # as CLIP_benchmark's command line does before evaluating
    theirs = cb.evaluate(torch.nn.Identity(), None, None, fewshot_k=-1, batch_size=32, num_workers=0, lr=0.1,
                         epochs=4, model_id="model", seed=seed, feature_root=str(tmp_path / "features"),
                         device="cuda", val_dataloader=[], amp=False)
    assert run["best_weight_decay"] == theirs["weight_decay"]
    assert len(run["val_acc1_by_weight_decay"]) > 3  # the search ran
    assert ours.metrics["lp_acc1"] == theirs["lp_acc1"]
    assert ours.metrics["lp_acc5"] == theirs["lp_acc5"]
    assert ours.metrics["lp_mean_per_class_recall"] == pytest.approx(theirs["lp_mean_per_class_recall"], abs=1e-12)
    assert 0.3 < ours.metrics["lp_acc1"] < 0.95  # a probe that had something to learn, not a trivial case


@pytest.mark.parametrize("method, fit", [("sklearn", "medclip.evaluation.linear_probe._fit"),
                                         ("clip_benchmark", "medclip.evaluation.probe_clip_benchmark.train")])
def test_k_shot_probes_are_fit_on_k_per_class_only(method, fit, monkeypatch, one_thread):
    """A given validation split chooses a k-shot probe's regularisation but adds no training samples to it
    (it does for the full training set)."""
    import importlib

    module_name, name = fit.rsplit(".", 1)
    module = importlib.import_module(module_name)
    real, sizes = getattr(module, name), []

    def spy(x, y, *args, **kwargs):
        sizes.append(len(y))
        return real(x, y, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    x_train, y_train = _blobs(40, 0)
    x_test, y_test = _blobs(30, 1)
    x_val, y_val = _blobs(10, 2)
    cfg = ProbeConfig(method=method, shots=(2,), fractions=(), seeds=(0,), sgd_epochs=2)
    res = linear_probe_features(x_train, y_train, x_test, y_test, 3, cfg, x_val, y_val)
    assert sizes[-1] == 6 and set(sizes) == {6}  # selection fits and the final fit: 2 per class
    assert res.settings["2-shot"]["mean"]["lp_acc1"] > 0.9
    sizes.clear()
    linear_probe_features(x_train, y_train, x_test, y_test, 3, ProbeConfig(method=method, seeds=(0,), sgd_epochs=2),
                          x_val, y_val)
    assert sizes[-1] == 120 + 30 and set(sizes[:-1]) == {120}


def test_probe_method_is_checked():
    with pytest.raises(MedclipError, match="unknown linear-probe method 'liblinear'"):
        ProbeConfig(method="liblinear")
