"""Grounding scores: pointing game and energy in box, and the evaluator over boxed shard samples."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from medclip.cli import main as cli_main
from medclip.concepts import (
    GroundingRecord,
    energy_in_box,
    evaluate_grounding,
    explain,
    grounding_records_from_shards,
    pointing_game,
)
from medclip.errors import MedclipError


def test_pointing_game_by_hand():
    heat = torch.zeros(10, 20)
    heat[4, 12] = 1.0  # row 4 (y), column 12 (x)
    assert pointing_game(heat, [10, 3, 14, 6])
    assert not pointing_game(heat, [0, 0, 12, 10])  # x1 is exclusive: column 12 is outside
    assert pointing_game(heat, [0, 0, 12.5, 10])  # a fractional edge covers the pixel it cuts
    assert not pointing_game(heat, [0, 0, 10, 10])
    assert not pointing_game(heat, [0, 0, 10, 10], tolerance=2)
    assert pointing_game(heat, [0, 0, 10, 10], tolerance=3)  # grown to x1 = 13: column 12 is inside
    assert not pointing_game(torch.ones(10, 20), [0, 0, 20, 10])  # a flat map points nowhere


def test_energy_in_box_by_hand():
    heat = torch.tensor([[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    assert energy_in_box(heat, [2, 0, 3, 1]) == pytest.approx(0.75)
    assert energy_in_box(heat, [0, 0, 3, 2]) == pytest.approx(1.0)
    shifted = heat * 2 - 5  # scale and offset do not change the energy share
    assert energy_in_box(shifted, [1, 0, 3, 1]) == pytest.approx(1.0)
    assert energy_in_box(torch.ones(4, 4), [0, 0, 2, 2]) == 0.0


@pytest.mark.parametrize("box,match", [
    ([5, 5, 5, 8], "empty or inverted"),
    ([30, 30, 40, 40], "outside"),
    ([1, 2, 3], "x0, y0, x1, y1"),
])
def test_bad_boxes_are_errors(box, match):
    with pytest.raises(MedclipError, match=match):
        pointing_game(torch.rand(10, 10), box)


def _image(seed: int, size=(72, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8))


def write_boxed_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, image, record in samples:
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("json", json.dumps(record).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_evaluator_agrees_with_maps_and_counts_bad_boxes(tiny_encoder, tmp_path):
    shard = tmp_path / "demo-000000.tar"
    boxes_a = [{"cui": "C1", "name": "liver", "bbox": [8, 8, 40, 40]},
               {"cui": "C2", "name": "kidney", "bbox": [30, 20, 70, 60]}]
    boxes_b = [{"cui": "C1", "name": "liver", "bbox": [0, 0, 36, 64]},
               {"cui": "C3", "name": "lung", "bbox": [50, 50, 50, 60]}]  # empty box: skipped, counted
    write_boxed_shard(shard, [("a", _image(0), {"boxes": boxes_a}), ("b", _image(1), {"boxes": boxes_b}),
                              ("c", _image(2), {"captions": ["no boxes"]})])
    records = grounding_records_from_shards([tmp_path])
    assert [(r.key, r.concept) for r in records] == [("a", "liver"), ("a", "kidney"), ("b", "liver"), ("b", "lung")]
    result = evaluate_grounding(tiny_encoder, records)
    assert result.n == 3 and result.method == "cosine"
    assert sum(result.skipped.values()) == 1
    hits, energies = [], []
    for record in records[:3]:
        heat = explain(tiny_encoder, record.image, [record.concept]).source_heatmaps()[0]
        assert heat.shape == (64, 72)
        hits.append(pointing_game(heat, record.box))
        energies.append(energy_in_box(heat, record.box))
    assert result.pointing_accuracy == pytest.approx(sum(hits) / 3)
    assert result.mean_energy == pytest.approx(sum(energies) / 3)
    assert result.per_concept["liver"]["n"] == 2


def test_grounding_points_at_a_planted_peak(tiny_encoder):
    """A map whose only peak is inside the box scores a hit and most of the energy."""
    image = _image(5, size=(64, 64))
    maps = explain(tiny_encoder, image, ["liver"])
    maps.scores = torch.zeros_like(maps.scores)
    maps.scores[0, 2, 5] = 10.0  # grid row 2, column 5 of 8x8 -> pixels x 40..48, y 16..24
    heat = maps.source_heatmaps()[0]
    assert pointing_game(heat, [40, 16, 48, 24])
    assert not pointing_game(heat, [0, 0, 32, 64])
    assert energy_in_box(heat, [32, 8, 56, 32]) > 0.9


def test_cli_grounding(tmp_path, capsys):
    shard = tmp_path / "d.tar"
    write_boxed_shard(shard, [("a", _image(0), {"boxes": [{"cui": "C1", "name": "liver", "bbox": [0, 0, 30, 30]}]})])
    out = tmp_path / "grounding.json"
    assert cli_main(["explain", "--grounding", str(shard), "--model", "medclip-tiny", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 1 and 0.0 <= result["mean_energy"] <= 1.0
    assert cli_main(["explain", "--grounding", str(tmp_path / "none.tar"), "--model", "medclip-tiny"]) == 2
    assert "no such shard" in capsys.readouterr().err


def test_records_without_boxes_are_an_error(tmp_path, tiny_encoder):
    shard = tmp_path / "x.tar"
    write_boxed_shard(shard, [("a", _image(0), {"captions": ["x"]})])
    with pytest.raises(MedclipError, match="no samples with boxes"):
        grounding_records_from_shards([shard])
    with pytest.raises(MedclipError, match="no usable"):
        evaluate_grounding(tiny_encoder, [GroundingRecord(_image(0), "liver", (5, 5, 5, 9))])
