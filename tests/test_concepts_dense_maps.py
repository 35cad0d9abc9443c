"""Concept maps every ``stride`` pixels by shift-and-stitch (``explain(..., stride=)``, ``--stride``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medclip.cli import main as cli_main
from medclip.concepts import explain
from medclip.concepts.explain import shifted_views, stitch
from medclip.concepts.grounding import pointing_game
from medclip.errors import MedclipError

CONCEPTS = ["pleural effusion", "liver", "kidney"]


def _patch_means(views: torch.Tensor, patch: int) -> torch.Tensor:
    """A stand-in model: each grid cell's score is the mean of its pixels, [V, 1, gh * gw]."""
    return F.avg_pool2d(views[:, :1], patch).flatten(1)[:, None]


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_stitched_cells_sit_every_stride_pixels(stride):
    # On a ramp (pixel value = its column), a cell's mean is the column at its window's centre, so the
    # stitched map says where each fine cell looks: cell k at stride * k + stride / 2 (pixel centres at +0.5).
    patch, size = 8, 64
    ramp = torch.arange(size, dtype=torch.float32).expand(3, size, size).clone()
    views = shifted_views(ramp, (patch, patch), stride, torch.full((3,), -1000.0))
    steps = (patch // stride, patch // stride)
    assert views.shape == (steps[0] * steps[1], 3, size, size)
    fine = stitch(_patch_means(views, patch), (size // patch, size // patch), steps)[0]
    assert fine.shape == (size // stride, size // stride)
    centres = stride * torch.arange(size // stride, dtype=torch.float32) + stride / 2 - 0.5
    inner = slice(patch // stride, -(patch // stride))  # cells whose window lies inside the image
    # Within half a pixel when patch - stride is odd (stride 1: whole-pixel shifts of 3.5 are rounded).
    tolerance = 0.5 if (patch - stride) % 2 else 0.0
    assert torch.allclose(fine[inner, inner], centres[None, inner].expand_as(fine[inner, inner]), atol=tolerance)
    # Every view has its own shift: along a row of the ramp the fine cells strictly increase.
    assert (fine[inner, inner].diff(dim=1) > 0).all()
    assert (fine[0] < 0).all()  # the first cells reach past the edge into the fill


def test_each_view_is_the_image_moved_by_whole_pixels(tiny_encoder):
    # Independently of shifted_views: paste the image on a black canvas 2 px right and down, take the plain
    # cosine map of that, and find it at the stitched map's (0, 0) phase (stride 4 on 8-px patches).
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, size=(64, 64, 3), dtype=np.uint8))
    fine = explain(tiny_encoder, image, CONCEPTS, stride=4).scores
    moved = Image.new("RGB", (64, 64))
    moved.paste(image, (2, 2))
    plain = explain(tiny_encoder, moved, CONCEPTS).scores
    assert fine.shape == (3, 16, 16)
    assert torch.allclose(fine[:, 0::2, 0::2], plain, atol=1e-5)


def test_stride_keeps_the_image_scores(tiny_encoder):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, size=(80, 96, 3), dtype=np.uint8))
    coarse = explain(tiny_encoder, image, CONCEPTS)
    fine = explain(tiny_encoder, image, CONCEPTS, stride=2)
    assert torch.allclose(coarse.image_scores, fine.image_scores, atol=1e-6)  # one batch or one image
    assert fine.scores.shape == (3, 32, 32)
    assert fine.source_heatmaps().shape == coarse.source_heatmaps().shape == (3, 80, 96)
    with pytest.raises(MedclipError, match="stride must divide the model's 8x8-pixel patch, got 3"):
        explain(tiny_encoder, image, CONCEPTS, stride=3)


class _Brightness:
    """A scorer whose cell score is the cell's mean brightness (cosine maps of a random model mean nothing)."""

    method = "cosine"

    def score(self, images, names):
        cells = F.avg_pool2d(images[:, :1], 8).flatten(1)[:, None].expand(-1, len(names), -1)
        return cells.max(dim=-1).values, cells


def test_a_stride_finds_a_spot_between_patch_centres(tiny_encoder):
    # A 5-px spot across a patch corner: one map per patch peaks at a patch centre, outside its box; maps every
    # 2 px peak on it.
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (29, 29, 34, 34))
    box = (29.0, 29.0, 34.0, 34.0)
    hits = {stride: pointing_game(explain(tiny_encoder, image, ["spot"], _Brightness(), stride)
                                  .source_heatmaps()[0], box) for stride in (None, 4, 2)}
    assert hits == {None: False, 4: True, 2: True}


def test_cli_stride(tmp_path, tiny_encoder, capsys):
    image = tmp_path / "scan.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, size=(64, 64, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "maps.png"
    assert cli_main(["explain", str(image), "--model", "medclip-tiny", "--concepts", "liver,kidney",
                     "--stride", "4", "-o", str(out)]) == 0
    assert out.is_file() and json.loads(capsys.readouterr().out)["png"] == str(out)
    assert cli_main(["explain", str(image), "--model", "medclip-tiny", "--concepts", "liver",
                     "--stride", "5", "-o", str(tmp_path / "x.png")]) != 0
    assert "stride must divide" in capsys.readouterr().err
