"""Parity with CLIP_benchmark's own metric functions (acc1, acc5, mean_per_class_recall, recall@k, mAP)."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb_zsc
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from PIL import Image

from medclip.evaluation import ClassSpec, EmbedOptions, EvalModel, read_dataset, zero_shot
from medclip.evaluation.metrics import average_precision_per_class, classification_metrics, retrieval_metrics


def _scalar_float(x):
    # CLIP_benchmark 1.6.2 calls float() on a 1-element 1-d array, a TypeError under numpy >= 2.4.
    if isinstance(x, np.ndarray):
        return builtins.float(x.reshape(-1)[0])
    return builtins.float(x)


@pytest.fixture
def cb_accuracy(monkeypatch):
    monkeypatch.setattr(cb_zsc, "float", _scalar_float, raising=False)
    return cb_zsc.accuracy


@pytest.mark.parametrize("num_classes", [3, 7])
def test_classification_metrics_equal_clip_benchmark(cb_accuracy, num_classes):
    from sklearn.metrics import balanced_accuracy_score

    gen = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(300, num_classes, generator=gen)
    target = torch.randint(0, num_classes, (300,), generator=gen)
    ours = classification_metrics(logits, target, num_classes)
    if num_classes >= 5:
        acc1, acc5 = cb_accuracy(logits, target, topk=(1, 5))
        assert ours["acc5"] == pytest.approx(acc5, abs=1e-6)
    else:
        (acc1,) = cb_accuracy(logits, target, topk=(1,))
        assert np.isnan(ours["acc5"])
    assert ours["acc1"] == pytest.approx(acc1, abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(target, logits.argmax(1)), abs=1e-6)


def _cb_recalls(image_emb, text_emb, owner, ks, batch_size=16):
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, batch_size,
                                                              "cpu", k=k) > 0).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T,
                                                             batch_size, "cpu", k=k) > 0).float().mean().item()
    return out


def test_retrieval_recall_equals_clip_benchmark_with_several_captions():
    gen = torch.Generator().manual_seed(1)
    images = F.normalize(torch.randn(60, 16, generator=gen), dim=-1)
    counts = torch.randint(1, 4, (60,), generator=gen)
    owner = torch.repeat_interleave(torch.arange(60), counts)
    texts = F.normalize(images[owner] + 0.9 * torch.randn(len(owner), 16, generator=gen), dim=-1)
    ours = retrieval_metrics(images, texts, owner, (1, 5, 10), max_elements=100)  # many small blocks
    ref = _cb_recalls(images, texts, owner, (1, 5, 10))
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < ours["image_retrieval_recall@1"] < ours["image_retrieval_recall@10"] < 1


def test_map_equals_clip_benchmark():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(80, 5, generator=gen)
    targets = (torch.rand(80, 5, generator=gen) < 0.3).long()
    ref = cb_zsc.average_precision_per_class(scores, targets)
    assert torch.allclose(average_precision_per_class(scores, targets), ref, atol=1e-6)


def _image_folder(root, n_per_class=6):
    rng = np.random.default_rng(0)
    for c, name in enumerate(["alpha", "beta", "gamma"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = (rng.random((40, 48, 3)) * 80 + c * 80).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_zero_shot_pipeline_equals_clip_benchmark_evaluate(cb_accuracy, tiny_encoder, tmp_path):
    """Same model, same images: medclip's zero-shot and CLIP_benchmark's evaluate give the same metrics."""
    data = read_dataset("image_folder", _image_folder(tmp_path / "imgs"))
    spec = ClassSpec(["alpha", "beta", "gamma"], templates=["a photo of {c}.", "an image of {c}."])
    # draft=False: every pixel exactly as the plain transform makes it (the batched to-tensor path stays on).
    ours = zero_shot(EvalModel(tiny_encoder), data, "label", spec, options=EmbedOptions(draft=False)).metrics

    class _Images(torch.utils.data.Dataset):
        classes = spec.labels

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return tiny_encoder.preprocess(data.images[i]), spec.labels.index(data.labels[i]["label"])

    loader = torch.utils.data.DataLoader(_Images(), batch_size=5)
    ref = cb_zsc.evaluate(tiny_encoder.model, loader, tiny_encoder.tokenizer, spec.labels, spec.templates,
                          "cpu", amp=False)
    assert ours["acc1"] == pytest.approx(ref["acc1"], abs=1e-6)
    assert ours["mean_per_class_recall"] == pytest.approx(ref["mean_per_class_recall"], abs=1e-6)
    assert np.isnan(ours["acc5"]) and np.isnan(ref["acc5"])


def test_retrieval_ties_never_count_in_the_models_favour():
    """A collapsed model (every embedding equal) scores chance, k/N, as in CLIP_benchmark, not 100%:
    a negative tied with the positive and earlier in item order ranks ahead of it."""
    images, texts = torch.ones(20, 8) / 8 ** 0.5, torch.ones(20, 8) / 8 ** 0.5
    owner = torch.arange(20)
    ours = retrieval_metrics(images, texts, owner, (1, 5, 10))
    ref = _cb_recalls(images, texts, owner, (1, 5, 10))
    for key, value in ref.items():
        k = int(key.rsplit("@", 1)[1])
        assert ours[key] == pytest.approx(k / 20) == pytest.approx(value), key
    assert ours["image_retrieval_mean_rank"] == ours["text_retrieval_mean_rank"] == pytest.approx(10.5)

    # One tie: text 1's own image (1) scores the same as image 0, which comes first: rank 2.
    # Text 0 ties with image 1, which comes after its own: rank 1. Blocks do not change ranks.
    images = torch.eye(3)
    texts = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    ours = retrieval_metrics(images, texts, torch.arange(3), (1, 2))
    assert ours["image_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert ours["image_retrieval_mean_rank"] == pytest.approx(4 / 3)
    assert retrieval_metrics(images, texts, torch.arange(3), (1, 2), max_elements=3) == ours
