"""Concept maps (PC-Align heads and plain cosine), ranked concepts, zero-shot annotation, heatmap PNG,
and the concept bottleneck classifier."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from medclip.cli import main as cli_main
from medclip.concepts import (
    BottleneckConfig,
    ConceptBottleneck,
    annotate_images,
    explain,
    rank_concepts,
    train_concept_bottleneck,
)
from medclip.errors import MedclipError
from medclip.models import towers
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig

CONCEPTS = ["pleural effusion", "liver", "kidney"]


def gradient_image(width=96, height=80, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _with_heads(name):
    import medclip

    torch.manual_seed(1)
    encoder = medclip.load(name, device="cpu")
    model = encoder.model
    heads = ConceptHeads(ConceptHeadsConfig(towers.image_width(model), towers.text_width(model), encoder.embed_dim))
    with torch.no_grad():
        heads.logit_bias.fill_(-2.0)
    encoder.heads = heads.eval()
    return encoder


@pytest.fixture(scope="module")
def headed_encoder():
    return _with_heads("medclip-tiny")


def test_cosine_maps_match_patch_and_text_embeddings(tiny_encoder):
    image = gradient_image()
    maps = explain(tiny_encoder, image, CONCEPTS)
    gh, gw = tiny_encoder.grid_size
    assert maps.method == "cosine" and maps.scores.shape == (3, gh, gw)
    patches = tiny_encoder.patch_embeddings([image], normalize=True)[0]  # [P, D]
    texts = tiny_encoder.encode_text(CONCEPTS)
    expected = (texts @ patches.T).reshape(3, gh, gw)
    torch.testing.assert_close(maps.scores, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(maps.image_scores, (tiny_encoder.encode_image([image]) @ texts.T)[0], atol=1e-5,
                               rtol=1e-4)
    assert maps.ranked()[0][1] == pytest.approx(float(maps.image_scores.max()))


@pytest.mark.parametrize("name", ["medclip-tiny", "medclip-tiny-bert"])
def test_pc_align_maps_use_the_heads(name):
    headed_encoder = _with_heads(name)  # BPE and WordPiece name tokens: start/end tokens are left out
    image = gradient_image(seed=3)
    maps = explain(headed_encoder, image, CONCEPTS)
    assert maps.method == "pc_align"
    enc, heads = headed_encoder, headed_encoder.heads
    with torch.no_grad():
        _, states = towers.image_tokens(enc.model, enc.preprocess(image)[None])
        patches = F.normalize(heads.embed_patches(states)[0], dim=-1)
        concepts = []
        for name in CONCEPTS:  # the name's content tokens, without start/end tokens
            ids = enc.tokenizer([name])
            n = int((ids[0] != 0).sum())
            _, text_states = towers.text_tokens(enc.model, ids)
            concepts.append(heads.embed_pooled_text(text_states[0, 1:n - 1].mean(0, keepdim=True))[0])
        concepts = F.normalize(torch.stack(concepts), dim=-1)
    expected = heads.logit_scale.exp() * concepts @ patches.T + heads.logit_bias
    torch.testing.assert_close(maps.scores.flatten(1), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(maps.image_scores, expected.max(dim=1).values, atol=1e-4, rtol=1e-4)


def test_heatmaps_png_and_geometry(tiny_encoder, tmp_path):
    image = gradient_image(width=120, height=60)
    maps = explain(tiny_encoder, image, ["liver", "lung"])
    assert maps.crop == (30.0, 0.0, 60.0, 60.0)  # 'shortest' resize then centre crop
    assert maps.heatmaps((32, 16)).shape == (2, 16, 32)
    source = maps.source_heatmaps()
    assert source.shape == (2, 60, 120)
    # Outside the crop the map holds its own minimum; the crop holds the upsampled scores.
    assert torch.all(source[:, :, :30] == source.flatten(1).min(dim=1).values[:, None, None])
    assert source[:, :, 30:90].max() == pytest.approx(float(maps.scores.max()), abs=0.05)
    path = maps.save_png(tmp_path / "maps.png", rank_concepts(tiny_encoder, image, ["liver", "lung", "brain"], 2))
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_rank_and_zero_shot_annotation(headed_encoder):
    images = [gradient_image(seed=s) for s in range(3)]
    ranked = rank_concepts(headed_encoder, images[0], CONCEPTS, top_k=2)
    maps = explain(headed_encoder, images[0], CONCEPTS)
    assert ranked == [(n, pytest.approx(s, abs=1e-4)) for n, s in maps.ranked()[:2]]
    labels = annotate_images(headed_encoder, images, CONCEPTS, top_k=3, batch_size=2)
    assert len(labels) == 3 and all(len(row) == 3 for row in labels)
    assert [d["name"] for d in labels[0]] == [n for n, _ in maps.ranked()]
    cut = max(d["score"] for d in labels[1]) - 1e-6
    assert [d["name"] for d in annotate_images(headed_encoder, images[1:2], CONCEPTS, threshold=cut)[0]] == [
        labels[1][0]["name"]]


def test_empty_concept_name_is_an_error(tiny_encoder):
    with pytest.raises(MedclipError, match="non-empty"):
        explain(tiny_encoder, gradient_image(), ["liver", " "])


def test_bottleneck_weights_read_as_class_evidence(tmp_path):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(300, 4, generator=gen)
    labels = (scores[:, 0] - scores[:, 2] > 0).long()  # class 1 <- concept a, class 0 <- concept c
    concepts, classes = ["a", "b", "c", "d"], ["normal", "abnormal"]
    model = ConceptBottleneck.fit(scores, labels, concepts, classes, BottleneckConfig(epochs=200))
    assert (model.predict(scores) == labels).float().mean() > 0.95
    assert model.class_evidence("abnormal", top=1)[0][0] == "a"
    assert model.class_evidence("normal", top=1)[0][0] == "c"
    assert model.describe().splitlines()[1].startswith("abnormal <- a (+")
    loaded = ConceptBottleneck.load(model.save(tmp_path / "cbm.json"))
    torch.testing.assert_close(loaded.logits(scores), model.logits(scores))
    with pytest.raises(MedclipError, match="labels"):
        ConceptBottleneck.fit(scores, labels + 5, concepts, classes)


def test_bottleneck_on_frozen_encoder_features(tiny_encoder):
    # Bright vs dark images: separable by any concept score that depends on intensity.
    images = [Image.new("RGB", (64, 64), (v, v, v)) for v in (10, 20, 30, 220, 230, 240)]
    model = train_concept_bottleneck(tiny_encoder, images, [0, 0, 0, 1, 1, 1], CONCEPTS, ["dark", "bright"],
                                     BottleneckConfig(epochs=100, l1=0.0))
    assert model.weight.shape == (2, 3)
    from medclip.concepts.bottleneck import concept_scores

    assert model.predict(concept_scores(tiny_encoder, images, CONCEPTS)).tolist() == [0, 0, 0, 1, 1, 1]


def test_cli_explain_writes_png(tmp_path, capsys):
    image = tmp_path / "img.png"
    gradient_image().save(image)
    names = tmp_path / "names.txt"
    names.write_text("liver\nlung\nbrain\n")
    out = tmp_path / "out.png"
    assert cli_main(["explain", str(image), "--model", "medclip-tiny", "--concepts", "liver,kidney",
                     "--vocab", str(names), "--top-k", "2", "-o", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert out.is_file() and report["method"] == "cosine" and len(report["top_concepts"]) == 2
    assert cli_main(["explain", str(tmp_path / "missing.png"), "--model", "medclip-tiny", "--concepts", "x"]) == 2


def test_cli_zero_shot_annotation(tmp_path):
    paths = []
    for seed in range(2):
        paths.append(tmp_path / f"{seed}.png")
        gradient_image(seed=seed).save(paths[-1])
    out = tmp_path / "labels.jsonl"
    assert cli_main(["concepts", "zero-shot", *map(str, paths), "--model", "medclip-tiny", "--concepts",
                     "liver,lung,brain", "--top-k", "2", "-o", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in rows] == list(map(str, paths))
    assert all(len(r["concepts"]) == 2 and r["concepts"][0]["score"] >= r["concepts"][1]["score"] for r in rows)
