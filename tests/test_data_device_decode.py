"""GPU JPEG decode (data.gpu_decode): workers ship JPEG bytes + the crop they drew, the consumer decodes.

The decode device is where the consumer moved the batch: on this CPU-only machine the whole path runs
with device=cpu (torchvision's libjpeg-turbo in place of nvJPEG). Real MedPix / COVID-CXR images
upscaled to 1-2k px, mixed in one shard with images that must take the worker's CPU path (PNG, a 16-bit
PNG, a JPEG stored turned, a truncated JPEG).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from engine_helpers import write_shard  # tests/ is on sys.path under pytest
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from test_data_reduced_decode import _real_images, _upscaled_jpeg
from torchvision import transforms

from medclip.data.augment import SampleImages
from medclip.data.batching import collate_images
from medclip.data.device_decode import PENDING_KEY, DeferredJpeg, decode_pending, pending_jpegs
from medclip.data.images import normalize_batch, seeded_augmentation
from medclip.data.manifest import Manifest, write_manifest
from medclip.data.stream import build_train_stream
from medclip.errors import MedclipError
from medclip.models.loading import build_model, resolve_config
from medclip.training.components import build_data
from medclip.training.config import load_recipe
from medclip.training.distributed import DistEnv

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
FLIPS = transforms.Compose([transforms.RandomResizedCrop(224, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip(),
                            transforms.RandomVerticalFlip(), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _turned_jpeg(image: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown after turning 90 degrees clockwise
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory) -> Path:
    """One manifest over 2 shards: 12 JPEGs the device decodes, 5 images the workers decode, 1 corrupt."""
    out = tmp_path_factory.mktemp("mixed")
    images = _real_images(14)
    samples = {f"jpeg{i:02d}": {"jpg": _upscaled_jpeg(im if i % 3 else im.convert("L"), 1024 if i % 2 else 2048)}
               for i, im in enumerate(images[:12])}
    ramp = np.linspace(1000, 3000, 300 * 200).reshape(200, 300).astype(np.uint16)
    samples.update({"png8": {"png": _png(np.asarray(images[12]))}, "png16": {"png": _png(ramp)},
                    "pngrgb": {"png": _png(np.asarray(images[13].resize((640, 480))))},
                    "turned": {"jpg": _turned_jpeg(images[12].resize((700, 500)))},
                    "turned2": {"jpg": _turned_jpeg(images[13].resize((500, 700)))},
                    "truncated": {"jpg": _upscaled_jpeg(images[0], 1024)[:5000]}})
    keys = sorted(samples)
    for key in keys:
        samples[key]["json"] = json.dumps({"captions": [f"image {key}"]}).encode()
    for part in range(2):
        write_shard(out / f"mixed-{part:06d}.tar", {k: samples[k] for k in keys[part::2]})
    return out


def _sources(shards: Path) -> list[Manifest]:
    return [Manifest("mixed", sorted(str(p) for p in shards.glob("*.tar")), caption_fields=["captions"])]


def _stream(shards: Path, tokenizer, device_decode: bool, transform=FLIPS, **options):
    return build_train_stream(_sources(shards), tokenizer, transform, batch_size=4, num_workers=2, shuffle_buffer=8,
                              fast_decode=False, device_decode=device_decode, **options)


def test_device_decode_batches_match_the_cpu_path(mixed_shards, tiny_encoder):
    # (a) + (c): same keys, shapes, dtype and normalisation; the JPEGs within the measured bound of the CPU
    # path's full decode of the same crop, everything else (PNG, 16-bit, EXIF-turned) bit-identical.
    device, cpu = (_stream(mixed_shards, tiny_encoder.tokenizer, on) for on in (True, False))
    got, want = list(device), list(cpu)
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    assert device.skip_counts() == cpu.skip_counts() == {"corrupt_image": 1}  # the truncated JPEG, in the worker
    deferred, diffs = 0, []
    for a, b in zip(got, want):
        pending = a[PENDING_KEY]
        assert PENDING_KEY not in b
        assert all(a["keys"][i].startswith("jpeg") for i in pending.index)  # only the JPEGs the device can take
        deferred += len(pending.index)
        a, b = normalize_batch(a, device), normalize_batch(b, cpu)
        assert PENDING_KEY not in a
        assert a["images"].shape == b["images"].shape and a["images"].dtype == b["images"].dtype == torch.float32
        for i, key in enumerate(a["keys"]):
            levels = ((a["images"][i] - b["images"][i]) * torch.tensor(STD).view(3, 1, 1) * 255).abs()
            if i in pending.index:
                diffs.append(levels)
            else:
                assert torch.equal(a["images"][i], b["images"][i]), key
    assert deferred == 12
    levels = torch.stack(diffs)
    print(f"device vs CPU full decode, 12 real JPEGs at 1024 / 2048 px: mean |diff| {levels.mean():.4f} levels, "
          f"worst image {levels.flatten(1).mean(1).max():.4f}, max {levels.max():.2f}")
    # Measured: mean 0.083, worst image 0.098, max 1 level (the float32 resize's rounding against PIL's fixed
    # point; libjpeg-turbo decodes bit for bit as PIL). Bilinear in place of the crop's bicubic gave mean 0.40,
    # max 20; a crop or flip out of step gives more.
    assert levels.mean() <= 0.15 and levels.flatten(1).mean(1).max() <= 0.25 and levels.max() <= 2.01


def test_device_decode_draws_the_cpu_paths_crops_and_flips():
    # (b): the crop drawn on the header's size from the same RNG draws as RandomResizedCrop on the full
    # image (so the same scale / aspect distribution), the flips drawn after it as the CPU path draws them.
    device = SampleImages(FLIPS, fast_decode=False, device_decode=True)
    cpu = SampleImages(FLIPS, fast_decode=False)
    flips = set()
    for width, height in ((2048, 1536), (1023, 1531), (700, 520)):
        buf = io.BytesIO()
        gradient = np.add.outer(np.arange(height) % 251, np.arange(width) % 241).astype(np.uint8)
        Image.fromarray(np.stack([gradient, np.roll(gradient, 37, axis=1), 255 - gradient], -1)).save(
            buf, "JPEG", quality=90)
        data = buf.getvalue()
        full = Image.open(io.BytesIO(data))
        for seed in range(60):
            with device.seeded(seed):
                drawn = device.augment(device.decode(data))
            assert isinstance(drawn, DeferredJpeg)
            with seeded_augmentation(seed):
                expected = transforms.RandomResizedCrop.get_params(full, (0.08, 1.0), (3 / 4, 4 / 3))
                expected_flips = tuple(d for d in (-1, -2) if torch.rand(1) < 0.5)
            assert drawn.box == expected and drawn.flips == expected_flips, (width, seed)
            flips.add(drawn.flips)
            if seed < 6:  # the pixels, flips included, are the CPU path's
                images = collate_images([drawn])
                decode_pending(images, pending_jpegs([drawn], lambda n: torch.empty(n, dtype=torch.uint8)), ["k"])
                with cpu.seeded(seed):
                    want = torch.from_numpy(cpu.augment(cpu.decode(data)))
                assert (images[0].int() - want.int()).abs().max() <= 2, (width, seed)
    assert flips == {(), (-1,), (-2,), (-1, -2)}


def test_resume_with_device_decode_is_exact(mixed_shards, tiny_encoder):
    # (d): the stream's state is still the workers' state: resumed after each batch, the rest is the same.
    full = []
    stream = _stream(mixed_shards, tiny_encoder.tokenizer, True)
    for batch in stream:
        full.append((normalize_batch(batch, stream), stream.state_dict()))
    assert len(full) >= 4
    for i in range(len(full) - 1):
        resumed = _stream(mixed_shards, tiny_encoder.tokenizer, True)
        resumed.load_state_dict(full[i][1])
        rest = [normalize_batch(b, resumed) for b in resumed]
        assert [b["keys"] for b in rest] == [b["keys"] for b, _ in full[i + 1:]]
        assert all(torch.equal(a["images"], b["images"]) for a, (b, _) in zip(rest, full[i + 1:]))


def _recipe_stream(shards: Path, tmp_path: Path, device: str, caplog):
    path = tmp_path / "recipe.yaml"
    manifest = write_manifest(tmp_path / "mixed.yaml", name="mixed", caption_fields=["captions"],
                              urls=sorted(str(p) for p in shards.glob("*.tar")))
    path.write_text(yaml.safe_dump({"model": {"name": "medclip-tiny"},
                                    "data": {"sources": [{"manifest": str(manifest)}], "batch_size": 4,
                                             "num_workers": 2, "gpu_decode": True},
                                    "run": {"output_dir": str(tmp_path / "run")}}))
    recipe, cfg = load_recipe(path), resolve_config("medclip-tiny")
    with caplog.at_level(logging.WARNING, logger="medclip"):
        return build_data(recipe, build_model(cfg, "cpu", "fp32"), cfg, DistEnv(0, 1, 0, "test"), tmp_path,
                          torch.device(device))


def test_recipe_gpu_decode_reaches_the_workers_on_cuda_and_falls_back_on_cpu(mixed_shards, tmp_path, caplog):
    on_cuda = _recipe_stream(mixed_shards, tmp_path, "cuda", caplog)  # a CUDA run's stream (no CUDA needed to build)
    assert not caplog.records
    batches = list(on_cuda)
    assert sum(len(b[PENDING_KEY].index) for b in batches if PENDING_KEY in b) > 0
    assert all(normalize_batch(b, on_cuda)["images"].dtype == torch.float32 for b in batches)
    on_cpu = _recipe_stream(mixed_shards, tmp_path, "cpu", caplog)
    assert [r.getMessage() for r in caplog.records] == [
        "data.gpu_decode: the run's device is cpu, not CUDA: JPEGs are decoded by the loader workers (the CPU path)"]
    assert not any(PENDING_KEY in b for b in on_cpu)


def test_a_jpeg_no_decoder_reads_stops_with_one_line(tiny_encoder):
    # Header and end-of-image marker intact, the entropy-coded data replaced: nothing can decode it.
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 60, 30)).save(buf, "JPEG")
    data = buf.getvalue()
    start = data.index(b"\xff\xda")
    broken = data[:start] + b"\xff\xd9"  # no scan at all
    drawn = DeferredJpeg(broken, (0, 0, 48, 64), (), (32, 32), transforms.InterpolationMode.BICUBIC)
    images = collate_images([drawn])
    with pytest.raises(MedclipError, match=r"^sample k: its JPEG cannot be decoded on cpu nor by PIL .*gpu_decode: false"):
        decode_pending(images, pending_jpegs([drawn], lambda n: torch.empty(n, dtype=torch.uint8)), ["k"])


def test_device_decode_without_a_fitting_transform_keeps_the_cpu_path(mixed_shards, tiny_encoder, caplog):
    center = image_transform_v2(PreprocessCfg(size=224), is_train=False)  # Resize + CenterCrop: nothing to defer
    with caplog.at_level(logging.WARNING, logger="medclip"):
        stream = _stream(mixed_shards, tiny_encoder.tokenizer, True, transform=center)
    assert [r.getMessage() for r in caplog.records if "device decode" in r.getMessage()] == [
        "device decode needs a train transform of RandomResizedCrop, flips and ToTensor (+ Normalize) with uint8 "
        "images; every image is decoded by the loader workers"]
    assert not any(PENDING_KEY in b for b in stream)
