"""The fast evaluation image pipeline: exact without draft, close with JPEG draft, fallbacks, bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from medclip.errors import MedclipError
from medclip.evaluation import EmbedOptions, EvalModel, read_dataset
from medclip.evaluation.images import BatchedTransform
from medclip.imaging import MedicalPreprocess, Window


def _smooth_rgb(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx + seed), np.cos(5 * yy - seed), np.sin(4 * (xx + yy))], axis=-1)
    return np.clip(127 + 100 * base + rng.normal(0, 4, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg_folder(root, sizes):
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(_smooth_rgb(h, w, 10 * c + i)).save(root / name / f"{i}.jpg", quality=92)
    return root


@pytest.mark.integration
def test_batched_transform_without_draft_is_bitwise_the_plain_preprocess(tiny_encoder, tmp_path):
    root = _jpeg_folder(tmp_path / "imgs", [(300, 260), (64, 80), (520, 512)])
    gray16 = np.arange(90 * 70, dtype=np.uint16).reshape(90, 70) * 9  # 16-bit PNG: windowed to 8-bit RGB
    Image.fromarray(gray16).save(root / "a" / "gray.png")
    data = read_dataset("image_folder", root)
    plain = torch.stack([tiny_encoder.preprocess(p) for p in data.images])
    transform = BatchedTransform(tiny_encoder.preprocess, draft=False)
    assert transform.batched and transform.draft_size == 0
    assert torch.equal(transform.collate([transform(p) for p in data.images]), plain)
    feats = EvalModel(tiny_encoder).embed_images(data, EmbedOptions(batch_size=3, draft=False))
    assert torch.allclose(feats, tiny_encoder.encode_image(data.images), atol=1e-5)


@pytest.mark.integration
def test_draft_decodes_large_jpegs_reduced_and_stays_close(tiny_encoder, tmp_path):
    root = _jpeg_folder(tmp_path / "imgs", [(512, 520), (600, 700)])  # >= 8x the 64 px input
    data = read_dataset("image_folder", root)
    transform = BatchedTransform(tiny_encoder.preprocess, draft=True)
    assert transform.draft_size == 64
    drafted = transform.collate([transform(p) for p in data.images])
    plain = torch.stack([tiny_encoder.preprocess(p) for p in data.images])
    assert drafted.shape == plain.shape
    assert not torch.equal(drafted, plain)  # draft really changed the decode
    assert (drafted - plain).abs().mean() < 0.05  # smooth images: nearly the same pixels
    model = EvalModel(tiny_encoder)
    on = model.embed_images(data, EmbedOptions(draft=True))
    off = model.embed_images(data, EmbedOptions(draft=False))  # not served from the draft=True memo
    assert not torch.equal(on, off)
    assert torch.nn.functional.cosine_similarity(on, off).min() > 0.99


def test_draft_leaves_small_jpegs_and_pngs_exact(tiny_encoder, tmp_path):
    root = _jpeg_folder(tmp_path / "imgs", [(100, 120)])  # < 2x the input: no reduced decode possible
    data = read_dataset("image_folder", root)
    transform = BatchedTransform(tiny_encoder.preprocess, draft=True)
    plain = torch.stack([tiny_encoder.preprocess(p) for p in data.images])
    assert torch.equal(transform.collate([transform(p) for p in data.images]), plain)


def test_shard_bytes_and_worker_processes_give_the_same_features(tiny_encoder, tmp_path):
    buf = io.BytesIO()
    Image.fromarray(_smooth_rgb(300, 300, 3)).save(buf, format="JPEG")
    images = [buf.getvalue()] * 5
    model = EvalModel(tiny_encoder)
    in_process = model.embed_images(images, EmbedOptions(batch_size=2, num_workers=0))
    workers = model.embed_images(images, EmbedOptions(batch_size=2, num_workers=2, prefetch_factor=1))
    assert torch.equal(in_process, workers)
    with Image.open(io.BytesIO(images[0])) as img:
        expected = tiny_encoder.encode_image([img.convert("RGB")])
    plain = model.embed_images(images[:1], EmbedOptions(draft=False))
    assert torch.allclose(plain, expected, atol=1e-5)


def test_windowed_or_unknown_transforms_fall_back_to_the_preprocess(tiny_encoder, tmp_path):
    windowed = MedicalPreprocess(tiny_encoder.preprocess.transform, Window(100, 200))
    transform = BatchedTransform(windowed)
    assert not transform.batched
    path = tmp_path / "x.png"
    Image.fromarray(_smooth_rgb(70, 70, 1)).save(path)
    assert torch.equal(transform.collate([transform(path)])[0], windowed(path))
    custom = BatchedTransform(lambda img: torch.zeros(3, 4, 4))
    assert not custom.batched and custom.collate([custom(path)]).shape == (1, 3, 4, 4)


def test_bad_images_are_one_line_errors(tiny_encoder, tmp_path):
    transform = BatchedTransform(tiny_encoder.preprocess)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(MedclipError, match="cannot read"):
        transform(broken)
    with pytest.raises(MedclipError, match="not found"):
        transform(tmp_path / "missing.jpg")
    with pytest.raises(MedclipError, match="cannot read image bytes"):
        transform(b"garbage")
