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
    ConceptScorer,
    GroundingRecord,
    energy_in_box,
    evaluate_grounding,
    explain,
    grounding_records_from_shards,
    pointing_game,
)
from medclip.concepts.grounding import baseline_grounding, prior_grounding
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


def test_records_from_shards(tmp_path):
    boxes_a = [{"cui": "C1", "name": "liver", "bbox": [8, 8, 40, 40]},
               {"cui": "C2", "name": "kidney", "bbox": [30, 20, 70, 60]}]
    boxes_b = [{"cui": "C1", "name": "liver", "bbox": [0, 0, 36, 64]}]
    write_boxed_shard(tmp_path / "demo-000000.tar", [("a", _image(0), {"boxes": boxes_a}),
                                                     ("b", _image(1), {"boxes": boxes_b}),
                                                     ("c", _image(2), {"captions": ["no boxes"]})])
    records = grounding_records_from_shards([tmp_path])
    assert [(r.key, r.concept, r.box) for r in records] == [
        ("a", "liver", (8, 8, 40, 40)), ("a", "kidney", (30, 20, 70, 60)), ("b", "liver", (0, 0, 36, 64))]
    assert records[0].image is records[1].image and records[0].image.size == (72, 64)
    assert np.array_equal(np.asarray(records[2].image), np.asarray(_image(1)))


def _bilinear_weights(cell: int, cells: int = 8, pixels: int = 64) -> np.ndarray:
    """Weight of grid cell ``cell`` at each output pixel of a bilinear upsampling with half-pixel
    centres (align_corners=False): source coordinate (p + 0.5) * cells / pixels - 0.5, clamped at 0."""
    source = np.clip((np.arange(pixels) + 0.5) * cells / pixels - 0.5, 0, cells - 1)
    return np.clip(1 - np.abs(source - cell), 0, None)


PLANTED = {"liver": (2, 5), "kidney": (6, 1)}  # concept -> (grid row, grid column) of its only peak


def _planted_score(self, images, names, batch_size=32):
    """ConceptScorer.score with known patch scores: 10 at the concept's planted cell, 0 elsewhere."""
    patch = torch.zeros(1, len(names), 64)
    for c, name in enumerate(names):
        row, col = PLANTED[name]
        patch[0, c, row * 8 + col] = 10.0
    return patch.amax(-1), patch


def test_evaluator_scores_planted_maps_by_hand(tiny_encoder, monkeypatch):
    """72x64 images: the model sees the centre 64x64 crop (x from 4), an 8x8 grid of 8-pixel patches.
    A peak at cell (r, c) is highest at model pixels 8c+3, 8c+4 (x) and 8r+3, 8r+4 (y)."""
    monkeypatch.setattr(ConceptScorer, "score", _planted_score)
    a, b = _image(0), _image(1)
    records = [GroundingRecord(a, "liver", (46, 18, 50, 22)),  # peak at source x 47-48, y 19-20: inside
               GroundingRecord(a, "kidney", (0, 0, 14, 50)),  # peak at x 15-16, y 51-52: 1 pixel right, below
               GroundingRecord(b, "liver", (49, 19, 60, 30)),  # peak x 47-48: 1 pixel left of the box
               GroundingRecord(b, "kidney", (50, 50, 50, 60))]  # empty box: skipped and counted
    expected_hits = {0.0: [1, 0, 0], 1.0: [1, 0, 1], 2.0: [1, 1, 1]}
    for tolerance, hits in expected_hits.items():
        result = evaluate_grounding(tiny_encoder, records, tolerance=tolerance)
        assert result.n == 3 and result.skipped == {"empty or inverted box": 1}
        assert result.pointing_accuracy == pytest.approx(sum(hits) / 3)
        assert result.per_concept["liver"]["n"] == 2 and result.per_concept["kidney"]["n"] == 1
        assert result.per_concept["liver"]["pointing_accuracy"] == pytest.approx((hits[0] + hits[2]) / 2)
    energies = []
    for record in records[:3]:  # the map in source pixels: the model's view pasted at x = 4, zero around it
        row, col = PLANTED[record.concept]
        canvas = np.zeros((64, 72))
        canvas[:, 4:68] = np.outer(_bilinear_weights(row), _bilinear_weights(col))
        x0, y0, x1, y1 = record.box
        energies.append(canvas[y0:y1, x0:x1].sum() / canvas.sum())
    assert result.mean_energy == pytest.approx(np.mean(energies))
    assert result.per_concept["kidney"]["mean_energy"] == pytest.approx(energies[1])
    assert all(0 < e < 1 for e in energies) and len(set(energies)) == 3


def test_reference_points_by_hand():
    image = Image.new("RGB", (20, 10))  # width 20, height 10: centre pixel (x 10, y 5)
    records = [GroundingRecord(image, "a", (10, 3, 14, 6)),  # 4 x 3 pixels around the centre
               GroundingRecord(image, "b", (0, 0, 5, 10))]  # 5 x 10 pixels on the left edge
    random0 = baseline_grounding(records, "random")
    assert random0.pointing_accuracy == pytest.approx((12 / 200 + 50 / 200) / 2)
    assert random0.mean_energy == pytest.approx((12 / 200 + 50 / 200) / 2)
    random2 = baseline_grounding(records, "random", tolerance=2)  # grown: 8 x 7 and 7 x 10 (clipped)
    assert random2.pointing_accuracy == pytest.approx((56 / 200 + 70 / 200) / 2)
    assert random2.mean_energy == random0.mean_energy  # energy is measured in the box itself
    centre = baseline_grounding(records, "centre")
    assert centre.pointing_accuracy == 0.5 and centre.mean_energy == 0.5
    assert baseline_grounding(records, "centre", tolerance=6).pointing_accuracy == 1.0  # x1 grown to 11
    assert baseline_grounding(records, "centre", tolerance=5).per_concept["b"]["pointing_accuracy"] == 0.0
    with pytest.raises(MedclipError, match="unknown grounding baseline"):
        baseline_grounding(records, "corner")


def test_concept_prior_by_hand():
    """The prior is each concept's box-coverage map over the fitting records, rescaled to the image."""
    small = Image.new("RGB", (20, 10))
    fit = [GroundingRecord(small, "a", (0, 0, 10, 10)), GroundingRecord(small, "a", (5, 0, 10, 10)),
           GroundingRecord(small, "c", (15, 0, 20, 10))]
    # Coverage of "a": columns 0-4 once, 5-9 twice, 10-19 never; its maximum is columns 5-9.
    records = [GroundingRecord(small, "a", (8, 2, 12, 4)),  # holds columns 8-9 of the maximum: a hit
               GroundingRecord(small, "a", (0, 0, 4, 10)),  # only once-covered columns: a miss
               GroundingRecord(Image.new("RGB", (40, 20)), "a", (16, 4, 24, 8)),  # twice the size: 10-19 max
               GroundingRecord(small, "b", (0, 0, 5, 5))]  # no box of "b" to fit on: skipped, counted
    prior = prior_grounding(fit, records)
    assert prior.method == "prior" and prior.n == 3 and prior.skipped == {"no box of 'b' in the records the "
                                                                          "prior is fitted on": 1}
    assert prior.pointing_accuracy == pytest.approx(2 / 3)
    assert [(r["concept"], r["box"], r["hit"]) for r in prior.per_record] == [
        ("a", [8, 2, 12, 4], 1.0), ("a", [0, 0, 4, 10], 0.0), ("a", [16, 4, 24, 8], 1.0)]
    # Energy of the first box: rows 2-3 x columns 8-11 hold 2 x 2 pixels at 1.0 of a total mass of
    # 10 rows x (5 x 0.5 + 5 x 1.0) = 75; the second box: rows 0-9 x columns 0-3, 40 pixels at 0.5.
    energies = [4 / 75, 20 / 75, (4 * 4 * 1.0) / (20 * (10 * 0.5 + 10 * 1.0))]
    assert prior.mean_energy == pytest.approx(np.mean(energies))
    assert prior_grounding(fit, records[1:2], tolerance=1).pointing_accuracy == 0.0  # grown to column 4
    assert prior_grounding(fit, records[1:2], tolerance=2).pointing_accuracy == 1.0  # grown to column 5


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
    # The model-free references need no model: the random point's hit chance is the box's pixel share.
    assert cli_main(["explain", "--grounding", str(shard), "--method", "random", "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["method"] == "random" and result["pointing_accuracy"] == pytest.approx(30 * 30 / (72 * 64))
    assert cli_main(["explain", "--grounding", str(shard), "--method", "prior", "--prior-from", str(shard),
                     "-o", str(out)]) == 0
    result = json.loads(out.read_text())  # fitted on the box it is scored on: a hit, all the energy
    assert result["method"] == "prior" and result["pointing_accuracy"] == 1.0 and result["mean_energy"] == 1.0
    assert cli_main(["explain", "--grounding", str(shard), "--method", "prior"]) == 2
    assert "--prior-from" in capsys.readouterr().err
    assert cli_main(["explain", "--grounding", str(shard), "--method", "heads", "--model", "medclip-tiny"]) == 2
    assert "no PC-Align heads" in capsys.readouterr().err
    assert cli_main(["explain", "--grounding", str(tmp_path / "none.tar"), "--model", "medclip-tiny"]) == 2
    assert "no such shard" in capsys.readouterr().err


def test_records_without_boxes_are_an_error(tmp_path, tiny_encoder):
    shard = tmp_path / "x.tar"
    write_boxed_shard(shard, [("a", _image(0), {"captions": ["x"]})])
    with pytest.raises(MedclipError, match="no samples with boxes"):
        grounding_records_from_shards([shard])
    with pytest.raises(MedclipError, match="no usable"):
        evaluate_grounding(tiny_encoder, [GroundingRecord(_image(0), "liver", (5, 5, 5, 9))])
