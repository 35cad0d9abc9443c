"""EXIF orientation is applied at every image entry point, for all eight orientations.

Each JPEG stores a known asymmetric pattern (a 3 x 2 grid of six colours, wider than tall) turned as
the EXIF tag says the camera held it; every entry point must give back the upright pattern.
"""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from medclip.cli import main
from medclip.data.augment import SampleImages
from medclip.data.manifest import Manifest
from medclip.data.stream import build_train_stream
from medclip.evaluation.images import decode
from medclip.imaging import load_image

COLOURS = np.array([[[230, 30, 30], [30, 200, 30], [30, 30, 230]],
                    [[230, 230, 30], [30, 220, 220], [220, 30, 220]]], dtype=np.uint8)  # [row, col, rgb]
CELL = 16
UPRIGHT = np.kron(COLOURS, np.ones((CELL, CELL, 1), dtype=np.uint8))  # 32 tall x 48 wide

# What the camera stored for each EXIF orientation (EXIF 2.3, tag 0x0112): the upright image turned the
# other way, so that applying the tag's transform shows it upright.
STORED = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],                   # mirrored left-right
    3: lambda a: a[::-1, ::-1],                # rotated 180
    4: lambda a: a[::-1],                      # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),         # transposed
    6: lambda a: np.rot90(a, 1),               # shown after turning 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # transversed
    8: lambda a: np.rot90(a, -1),              # shown after turning 90 degrees counter-clockwise
}
ORIENTATIONS = sorted(STORED)


def jpeg_bytes(orientation: int, with_tag: bool = True) -> bytes:
    exif = Image.Exif()
    if with_tag:
        exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(STORED[orientation](UPRIGHT))).save(
        buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    return buf.getvalue()


def upright_cells(pixels: np.ndarray) -> bool:
    """Is ``pixels`` ([H, W, 3], any scale) the upright pattern? Cell centres within 40 of each colour."""
    h, w = pixels.shape[:2]
    if abs(w / h - 1.5) > 0.1:
        return False
    for r in range(2):
        for c in range(3):
            cell = pixels[int((r + 0.25) * h / 2):int((r + 0.75) * h / 2),
                          int((c + 0.25) * w / 3):int((c + 0.75) * w / 3)].reshape(-1, 3).mean(0)
            if np.abs(cell - COLOURS[r, c]).max() > 40:
                return False
    return True


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("exif")
    paths = {}
    for o in ORIENTATIONS:
        paths[o] = root / f"orientation{o}.jpg"
        paths[o].write_bytes(jpeg_bytes(o))
    paths["reference"] = root / "upright.png"
    Image.fromarray(UPRIGHT).save(paths["reference"])
    return paths


def test_the_pattern_tells_orientations_apart():
    # without its tag, every orientation but 1 is stored turned: the check below cannot pass by accident
    for o in ORIENTATIONS:
        stored = np.asarray(Image.open(io.BytesIO(jpeg_bytes(o, with_tag=False))).convert("RGB"))
        assert upright_cells(stored) == (o == 1)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_load_image_and_eval_decoding_are_upright(files, orientation):
    data = files[orientation].read_bytes()
    assert upright_cells(np.asarray(load_image(files[orientation])))
    assert upright_cells(np.asarray(decode(files[orientation])))
    assert upright_cells(np.asarray(decode(data)))  # shard bytes (eval's wds reader)
    drafted = decode(files[orientation], None, draft_size=12)  # JPEG draft: decoded at half scale, then turned
    assert drafted.size == (24, 16) and upright_cells(np.asarray(drafted))


def test_encode_image_and_explain_see_the_upright_image(files, tiny_encoder):
    from medclip.concepts.explain import explain

    def model_input(image) -> torch.Tensor:  # the pixels encode_image embeds
        return next(tiny_encoder.image_batches([image], 1))[0]

    reference, ref_input = tiny_encoder.encode_image(files["reference"]), model_input(files["reference"])
    ref_view = np.asarray(explain(tiny_encoder, files["reference"], ["mass"]).image, dtype=np.float64)
    sideways = Image.open(io.BytesIO(jpeg_bytes(6, with_tag=False)))
    far = (tiny_encoder.encode_image(sideways) - reference).norm()
    assert (model_input(sideways) - ref_input).abs().mean() > 0.5  # a turned image is far off in pixels
    for o in ORIENTATIONS:
        got = tiny_encoder.encode_image([files[o], Image.open(files[o])])  # a path and a PIL image
        assert (got - reference).norm(dim=1).max() < far / 3, o
        for image in (files[o], Image.open(files[o])):
            assert (model_input(image) - ref_input).abs().mean() < 0.05, o
        maps = explain(tiny_encoder, files[o], ["mass"])
        assert maps.source_size == (48, 32)
        assert np.abs(np.asarray(maps.image, dtype=np.float64) - ref_view).mean() < 4, o


def test_shard_builder_stores_the_upright_image(files, tmp_path):
    table = tmp_path / "table.jsonl"
    table.write_text("".join(json.dumps({"image": str(files[o]), "caption": f"orientation {o}"}) + "\n"
                             for o in ORIENTATIONS))
    assert main(["shards", "build", str(table), "--out", str(tmp_path / "shards"), "--prefix", "x",
                 "--processes", "2"]) == 0
    images = []
    for shard in sorted((tmp_path / "shards").glob("x-*.tar")):
        with tarfile.open(shard) as tar:
            images += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    assert len(images) == len(ORIENTATIONS)
    for data in images:  # plain PIL, no orientation applied: the stored pixels themselves are upright
        assert upright_cells(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_training_loader_turns_images_of_foreign_shards_upright(tmp_path, tiny_encoder):
    shard = tmp_path / "camera-000000.tar"  # a shard written by another tool, EXIF kept in the JPEGs
    with tarfile.open(shard, "w") as tar:
        for o in ORIENTATIONS:
            for ext, data in (("jpg", jpeg_bytes(o)), ("txt", f"orientation {o}".encode())):
                info = tarfile.TarInfo(f"sample{o}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    transform = transforms.Compose([transforms.Resize((32, 48)), transforms.ToTensor()])
    stream = build_train_stream([Manifest("camera", [str(shard)])], tiny_encoder.tokenizer, transform,
                                batch_size=4, num_workers=2)
    seen = {}
    for batch in stream:
        images = batch["images"]
        pixels = images.float() if images.dtype == torch.uint8 else images * 255
        for key, img in zip(batch["keys"], pixels):
            seen[key] = upright_cells(img.permute(1, 2, 0).numpy())
    assert seen == {f"sample{o}": True for o in ORIENTATIONS}


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_fast_decode_draws_the_training_crop_on_the_upright_image(orientation):
    """The loader's fast decode draws its random crop before decoding; for a turned image that draw must
    not happen on the stored frame. The crop covers the whole upright image (scale 1, its aspect), so a
    crop drawn on the stored, sideways frame would cut the pattern."""
    big = Image.fromarray(np.ascontiguousarray(STORED[orientation](np.kron(UPRIGHT, np.ones((8, 8, 1), np.uint8)))))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95, subsampling=0, exif=exif.tobytes())  # 256 x 384 upright: 4x the crop
    crop = transforms.Compose([transforms.RandomResizedCrop((64, 96), scale=(1.0, 1.0), ratio=(1.5, 1.5)),
                               transforms.PILToTensor()])
    images = SampleImages(crop, uint8_images=False, gray_shortcut=False, fast_decode=True)
    with images.seeded(0):
        out = images.augment(images.decode(buf.getvalue()))
    assert upright_cells(out.permute(1, 2, 0).numpy())
