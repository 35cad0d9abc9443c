"""Fast decode (data.fast_decode): large JPEGs decoded at the DCT scale the random crop needs.

Real MedPix / COVID-CXR images upscaled to the sizes the UniMed sources are released at (1-2k px) and
re-encoded as JPEG: the crops drawn are the ones a full decode draws, the pixels stay within a measured
bound of a full decode, and the recipe switch reaches the loader's workers.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import require_shared  # tests/ is on sys.path under pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms

from medclip.data.augment import SampleImages
from medclip.data.builder import BuildConfig, build_shards, read_table
from medclip.data.images import seeded_augmentation
from medclip.data.manifest import Manifest, write_manifest
from medclip.data.stream import build_train_stream
from medclip.imaging import Window, apply_window, gray_uint8
from medclip.models.loading import build_model, resolve_config
from medclip.training.components import build_data
from medclip.training.config import load_recipe
from medclip.training.distributed import DistEnv

TRAIN_224 = image_transform_v2(PreprocessCfg(size=224), is_train=True)  # the recipes' train transform
FLIP_AFTER_CROP = transforms.Compose([transforms.RandomResizedCrop(96, scale=(0.08, 1.0)),
                                      transforms.RandomHorizontalFlip(), transforms.ToTensor()])


def _real_images(n: int) -> list[Image.Image]:
    """n real images, half chest X-rays (COVID-CXR), half CT/MRI (MedPix), as RGB."""
    images = []
    for folder in ("covid-cxr", "medpix"):
        table = require_shared(folder, "train.jsonl")
        for line in table.read_text().splitlines()[: n // 2]:
            images.append(Image.open(table.parent / json.loads(line)["image"]).convert("RGB"))
    return images


def _upscaled_jpeg(image: Image.Image, side: int, quality: int = 90) -> bytes:
    """``image`` with its longer side at ``side`` px, as JPEG (the shared images are stored at <= 256 px)."""
    scale = side / max(image.size)
    big = image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _run(images: SampleImages, data: bytes, seed: int):
    with images.seeded(seed):
        opened = images.decode(data)
        return opened, images.augment(opened)


def test_fast_decode_draws_the_crops_a_full_decode_draws():
    # Odd sizes too: the reduced image is ceil(side / s) and the box must map exactly.
    fast = SampleImages(FLIP_AFTER_CROP, fast_decode=True)
    reduced: dict[int, int] = {}
    for width, height in ((2048, 1536), (1023, 1531), (700, 520)):
        data = _upscaled_jpeg(Image.new("RGB", (width, height), (90, 60, 30)), max(width, height))
        full = Image.open(io.BytesIO(data))
        assert full.size == (width, height)
        for seed in range(150):
            opened, _ = _run(fast, data, seed)
            scale = math.ceil(width / opened.image.width)
            assert opened.image.size == (math.ceil(width / scale), math.ceil(height / scale))
            reduced[scale] = reduced.get(scale, 0) + 1
            box = opened.crop
            drawn = tuple(round(v * scale, 6) for v in (box.top, box.left, box.bottom - box.top, box.right - box.left))
            with seeded_augmentation(seed):  # the draw RandomResizedCrop makes on the full image
                expected = transforms.RandomResizedCrop.get_params(full, (0.08, 1.0), (3 / 4, 4 / 3))
            assert drawn == tuple(float(v) for v in expected), (width, seed)
            # never decoded so small that the crop would be upsampled
            assert min(box.right - box.left, box.bottom - box.top) >= 96
    print("reductions used (scale: crops):", dict(sorted(reduced.items())))
    assert {1, 2, 4, 8} <= set(reduced)  # the scale follows each crop's size, up to 1/8


def test_fast_decode_pixels_stay_within_the_measured_bound():
    # Measured on these 16 images x 4 seeds (224 px open_clip train transform), fast vs full decode, uint8:
    # mean |diff| 0.21 / 0.32 / 0.33 levels at 512 / 1024 / 2048 px, worst image mean 1.11, max 29 (burned-in
    # text edges). Bounds with margin; a crop off by a few pixels or a flip out of step gives > 5 levels.
    fast, full = SampleImages(TRAIN_224, fast_decode=True), SampleImages(TRAIN_224, fast_decode=False)
    flip_fast, flip_full = SampleImages(FLIP_AFTER_CROP, fast_decode=True), SampleImages(FLIP_AFTER_CROP, fast_decode=False)
    for side in (512, 1024, 2048):
        means, worst, reduced = [], 0, 0
        for image in _real_images(16):
            data = _upscaled_jpeg(image, side)
            for seed in range(4):
                opened, a = _run(fast, data, seed)
                reduced += max(opened.image.size) <= side // 2
                _, b = _run(full, data, seed)
                diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
                means.append(diff.mean())
                worst = max(worst, int(diff.max()))
            for seed in range(2):  # steps after the crop draw from the RNG in step with a full decode
                flip = np.abs(_run(flip_fast, data, seed)[1].astype(np.int16) - _run(flip_full, data, seed)[1])
                assert flip.mean() <= 2.0
        print(f"{side} px: {reduced} of {len(means)} reduced, mean |diff| {np.mean(means):.3f}, "
              f"worst image {max(means):.3f}, max {worst}")
        # at 512 px only crops >= 448 px on both sides are reduced (never upsampled); from 1024 px all are
        assert reduced == len(means) if side >= 1024 else reduced > 0
        assert np.mean(means) <= 0.6 and max(means) <= 2.0 and worst <= 48


@pytest.fixture(scope="module")
def large_shards(tmp_path_factory) -> Path:
    """Shards of 24 real images upscaled to 1024 / 2048 px (JPEG), built by medclip's builder."""
    out = tmp_path_factory.mktemp("large")
    rows = []
    for i, image in enumerate(_real_images(24)):
        path = out / f"img{i}.jpg"
        path.write_bytes(_upscaled_jpeg(image, 1024 if i % 2 else 2048))
        rows.append({"image": str(path), "caption": f"image number {i}"})
    table = out / "rows.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = build_shards(read_table(table), BuildConfig(out / "shards", prefix="large", max_samples=8))
    write_manifest(out / "shards" / "large.yaml", name="large", urls=[str(report.out_dir / s.name) for s in report.shards],
                   caption_fields=["captions"])
    return out / "shards"


def _recipe_batches(shards: Path, tmp_path: Path, fast_decode: bool | None) -> list[dict]:
    data = {"sources": [{"manifest": str(shards / "large.yaml")}], "batch_size": 6, "num_workers": 2,
            "shuffle_buffer": 8}
    if fast_decode is not None:
        data["fast_decode"] = fast_decode
    path = tmp_path / f"recipe-{fast_decode}.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "medclip-tiny"}, "data": data,
                                    "run": {"output_dir": str(tmp_path / "run")}}))
    recipe = load_recipe(path)
    cfg = resolve_config("medclip-tiny")
    stream = build_data(recipe, build_model(cfg, "cpu", "fp32"), cfg, DistEnv(0, 1, 0, "test"), tmp_path)
    return list(stream)


def test_recipe_switch_reaches_the_loader_workers(large_shards, tmp_path):
    default, on, off = (_recipe_batches(large_shards, tmp_path, v) for v in (None, True, False))
    assert [b["keys"] for b in default] == [b["keys"] for b in on] == [b["keys"] for b in off]
    assert sum(len(b["keys"]) for b in on) == 18  # drop_last: whole batches of 6 from 16 + 8 samples (2 workers)
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(default, on))  # on by default
    diffs = [(a["images"].to(torch.int16) - b["images"].to(torch.int16)).abs() for a, b in zip(on, off)]
    mean = torch.cat([d.flatten() for d in diffs]).float().mean().item()
    print(f"fast vs full decode through the recipe's loader: mean |diff| {mean:.3f} levels")
    assert 0 < mean <= 0.6  # a reduced decode ran in the workers (pixels differ), within the bound above


def test_16_bit_png_is_windowed_not_saturated(tmp_path, tiny_encoder):
    # A 16-bit PNG (values 1000..3000, as CT / X-ray exports) in a shard: PIL's convert("RGB") clips every
    # value above 255 to white; the loader maps the image's own range to 0..255 as the evaluator does.
    ramp = np.linspace(1000, 3000, 64 * 48).reshape(48, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    shard = tmp_path / "png16-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("a.png", buf.getvalue()), ("a.json", json.dumps({"captions": ["a ramp"]}).encode())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    resize = transforms.Compose([transforms.Resize((48, 64)), transforms.ToTensor()])
    stream = build_train_stream([Manifest("png16", [str(shard)], caption_fields=["captions"])], tiny_encoder.tokenizer,
                                resize, batch_size=1, num_workers=2)
    images = [b["images"] for b in stream]
    assert len(images) == 1 and stream.skip_counts() == {}
    pixels = images[0][0, 0]  # [H, W] of the first channel (R = G = B)
    expected = np.round((ramp - 1000.0) / 2000.0 * 255).astype(np.uint8)
    assert torch.equal(pixels, torch.from_numpy(expected))


def test_16_bit_table_gives_the_float_window_values():
    # gray_uint8's 65,536-entry table for 16-bit images against apply_window's float64 path, value for value.
    rng = np.random.default_rng(0)
    for lo, hi in ((0, 65535), (1000, 3000), (512, 513), (7, 7)):
        pixels = rng.integers(lo, hi + 1, size=(40, 50)).astype(np.uint16)
        for window in (None, Window(2000, 1500)):
            expected = np.round(apply_window(pixels, window) * 255.0).astype(np.uint8)
            assert np.array_equal(gray_uint8(pixels, window), expected)
            assert np.array_equal(gray_uint8(pixels.astype(">u2"), window), expected)  # I;16B
