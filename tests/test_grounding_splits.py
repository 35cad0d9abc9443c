"""Grounding splits where position cannot be guessed (issue 28): the demo set's random layout and findings
planted into real images of ../shared/data. Built through the user's commands (`medclip data demo --layout`,
`medclip data planted`) at small sizes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_error_line, require_shared

from medclip.concepts.grounding import baseline_grounding, grounding_records_from_shards, prior_grounding
from medclip.data.demo import demo_records

MEDCLIP = [sys.executable, "-m", "medclip"]


def _medclip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEDCLIP, *args], capture_output=True, text=True, timeout=300)


def _demo(tmp_path_factory, layout: str) -> Path:
    out = tmp_path_factory.mktemp(f"demo-{layout}")
    done = _medclip("data", "demo", "--out", str(out), "--n-train", "1200", "--n-val", "300", "--image-size", "48",
                    "--layout", layout)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def anatomical(tmp_path_factory) -> Path:
    return _demo(tmp_path_factory, "anatomical")


@pytest.fixture(scope="module")
def randomised(tmp_path_factory) -> Path:
    return _demo(tmp_path_factory, "random")


def _records(folder: Path, split: str):
    return grounding_records_from_shards(sorted(folder.glob(f"demo-{split}-*.tar")))


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical distributions."""
    grid = np.concatenate([a, b])
    cdf = lambda v: np.searchsorted(np.sort(v), grid, side="right") / len(v)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def _concepts_whose_centres_differ(folder: Path) -> list[str]:
    """Concepts (>= 40 boxes) whose box centres (x or y, fractions of the image) differ from all other concepts'
    at the 0.1 % level of the two-sample KS test."""
    records = _records(folder, "train") + _records(folder, "val")
    centres: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        side = r.image.size[0]
        centres.setdefault(r.concept, []).append(((r.box[0] + r.box[2]) / 2 / side, (r.box[1] + r.box[3]) / 2 / side))
    differ = []
    for concept, mine in centres.items():
        rest = np.array([c for other, cs in centres.items() if other != concept for c in cs])
        mine_a = np.array(mine)
        if len(mine_a) < 40:
            continue
        n, m = len(mine_a), len(rest)
        critical = 1.95 * np.sqrt((n + m) / (n * m))  # alpha = 0.001
        if any(_ks_statistic(mine_a[:, k], rest[:, k]) > critical for k in (0, 1)):
            differ.append(concept)
    return differ


def test_random_layout_box_centres_do_not_depend_on_the_concept(anatomical, randomised):
    assert _concepts_whose_centres_differ(randomised) == []
    assert len(_concepts_whose_centres_differ(anatomical)) >= 4  # where a finding usually is gives it away


def test_random_layout_brings_the_concept_prior_to_chance(anatomical, randomised):
    """The prior (each concept's training-box coverage, bench/pc_align_value.py's row) against a uniformly random
    point, pointing game at tolerance 0 on the held-out split."""
    ratios = {}
    for name, folder in (("anatomical", anatomical), ("random", randomised)):
        held_out = _records(folder, "val")
        prior = prior_grounding(_records(folder, "train"), held_out).pointing_accuracy
        ratios[name] = prior / baseline_grounding(held_out, "random").pointing_accuracy
    assert ratios["random"] < 2.0, ratios
    assert ratios["anatomical"] > 5.0, ratios


def test_random_layout_keeps_each_finding_inside_its_anatomy(randomised):
    """The scene moves with its finding: a CT nodule stays inside the body (not on the black outside), an MRI
    mass inside the brain's grey, whatever the image position."""
    from medclip.data.demo import iter_demo_split

    checked = 0
    for sample in iter_demo_split(randomised, "val"):
        for box in sample.boxes:
            x0, y0, x1, y1 = box["bbox"]
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            pixel = np.asarray(sample.image)[cy, cx].mean()
            if (sample.labels["modality"], box["name"]) in (("CT", "nodule"), ("MRI", "mass")):
                assert pixel > 60, (sample.key, box)  # the lesion's grey, not the air outside
                checked += 1
    assert checked >= 5


def _default_pixels_and_labels() -> str:
    digest = hashlib.sha256()
    for record in demo_records(12, seed=0, image_size=48):
        digest.update(np.asarray(record.image).tobytes())
        digest.update(json.dumps([record.captions, record.labels, record.boxes, record.concepts]).encode())
    return digest.hexdigest()


def test_the_shipped_demo_split_is_unchanged():
    """The default (anatomical) layout draws the same random streams as before the layout option: these are the
    pixels, labels and boxes of the shipped demo set's first 12 records (seed 0, 48 px)."""
    assert _default_pixels_and_labels() == "7ff2c6c5ae928e7626c642f2129bb6024679aed1f93a0d6e03426490f3f4f9a6"


def test_the_shipped_demo_split_builds_byte_identical_by_default(tmp_path):
    for name, extra in (("default", []), ("anatomical", ["--layout", "anatomical"])):
        assert _medclip("data", "demo", "--out", str(tmp_path / name), "--n-train", "30", "--n-val", "12",
                        "--image-size", "32", *extra).returncode == 0
    for path in sorted((tmp_path / "default").iterdir()):
        assert path.read_bytes() == (tmp_path / "anatomical" / path.name).read_bytes(), path.name


def test_the_recipe_builds_the_random_layout_and_refuses_an_unknown_one(tmp_path):
    from medclip.data.demo import LAYOUTS
    from medclip.models.registry import get_model_config
    from medclip.training.components import demo_dir, prepare_demo
    from medclip.training.config import CHOICES, load_recipe

    assert CHOICES["data.demo_layout"] == LAYOUTS
    recipe = load_recipe("demo", ["data.demo_layout=random", "data.demo_train_samples=12",
                                  "data.demo_val_samples=6"])
    prepare_demo(recipe, get_model_config(recipe.model.name), tmp_path, is_main=True)
    assert "random layout" in (demo_dir(tmp_path) / "demo-train.yaml").read_text()
    bad = _medclip("pretrain", "--config", "demo", "--set", "data.demo_layout=diagonal", "--print-recipe")
    assert bad.returncode == 2
    assert "data.demo_layout" in one_error_line(bad.stderr)


# ---------------------------------------------------------------------------------------- planted findings


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Path:
    root = require_shared()
    out = tmp_path_factory.mktemp("planted")
    done = _medclip("data", "planted", "--out", str(out), "--root", str(root), "--n-train", "30", "--n-val", "16",
                    "--image-size", "64", "--seed", "3")
    assert done.returncode == 0, done.stderr
    assert "planted-val: " in done.stdout
    return out


def _samples(folder: Path, split: str) -> list[dict]:
    from medclip.concepts.shards import iter_shard_samples, sample_image

    samples = []
    for shard in sorted(folder.glob(f"planted-{split}-*.tar")):
        for sample in iter_shard_samples(shard):
            samples.append({**sample["json"], "key": sample["key"], "pixels": np.asarray(sample_image(sample, shard))})
    return samples


def _table_ids(root: Path, folder: str, table: str, field: str) -> set[str]:
    return {str(json.loads(line)[field]) for line in (root / folder / table).read_text().splitlines() if line}


@pytest.mark.integration  # real images of ../shared/data
def test_planted_findings_sit_inside_the_body_with_their_contrast(planted):
    """Each box holds its finding inside the original image's body region, brighter or darker than the original
    by about the finding's contrast; captions name every finding with spans on the names."""
    from medclip.data.planted import LESIONS, _square_gray, body_mask

    root, kinds = require_shared(), {lesion.name: lesion for lesion in LESIONS}
    samples = _samples(planted, "train") + _samples(planted, "val")
    assert len(samples) >= 40 and {s["labels"]["dataset"] for s in samples} == {"covid-cxr", "medpix"}
    for s in samples:
        original = _square_gray(root / s["labels"]["dataset"] / s["labels"]["image"], 64)
        body = body_mask(original)
        now = s["pixels"][..., 0].astype(np.float32) / 255.0
        assert 1 <= len(s["boxes"]) <= 2
        for box in s["boxes"]:
            x0, y0, x1, y1 = (int(round(v)) for v in box["bbox"])
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
            assert body[y0:y1, x0:x1].mean() > 0.9, (s["key"], box)
            lesion = kinds[box["name"]]
            change = float((now - original)[y0:y1, x0:x1].mean())
            assert np.sign(change) == np.sign(lesion.contrast) and abs(change) > 0.05, (s["key"], box, change)
            assert any(box["name"] in c for c in s["captions"])
        for c in s["concepts"]:
            assert s["captions"][c["caption_index"]][c["start"]:c["end"]].lower() == c["name"]
        assert s["labels"]["modality"] in s["captions"][2]  # the image's real modality from the table


@pytest.mark.integration  # real images of ../shared/data
def test_planted_train_and_held_out_images_come_from_different_patients(planted):
    root = require_shared()
    sides = {split: _samples(planted, split) for split in ("train", "val")}
    for dataset, (train_table, held_table, field) in {"covid-cxr": ("train.jsonl", "test.jsonl", "patient_id"),
                                                      "medpix": ("train.jsonl", "dev.jsonl", "case_id")}.items():
        train_ids = {s["labels"]["case"] for s in sides["train"] if s["labels"]["dataset"] == dataset}
        held_ids = {s["labels"]["case"] for s in sides["val"] if s["labels"]["dataset"] == dataset}
        assert train_ids <= _table_ids(root, dataset, train_table, field)
        assert held_ids <= _table_ids(root, dataset, held_table, field)
        assert not train_ids & held_ids


@pytest.mark.integration  # real images of ../shared/data
def test_planted_shards_feed_pc_align_and_grounding(planted, tiny_encoder):
    """The training stream (two loader workers) reads the planted manifest with concept spans on the finding
    names, and the grounding evaluation reads its boxes."""
    from torchvision import transforms

    from medclip.data.manifest import load_manifest
    from medclip.data.stream import build_train_stream

    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    stream = build_train_stream([load_manifest(planted / "planted-train.yaml", planted)], tiny_encoder.tokenizer,
                                transform, batch_size=8, num_workers=2)
    batches = list(stream)
    assert sum(len(b["keys"]) for b in batches) == load_manifest(planted / "planted-train.yaml", planted).samples
    assert all(b["concept_mask"].any(dim=1).all() for b in batches)  # every image names its findings
    records = grounding_records_from_shards(sorted(planted.glob("planted-val-*.tar")))
    assert len(records) >= 16 and all(r.image.size == (64, 64) for r in records)


def test_planted_refuses_a_patient_on_both_sides(tmp_path):
    """A data root whose training and held-out tables share a patient is refused in one line."""
    for folder, tables in {"covid-cxr": ("train.jsonl", "test.jsonl"), "medpix": ("train.jsonl", "dev.jsonl")}.items():
        (tmp_path / folder).mkdir()
        for i, table in enumerate(tables):
            row = {"image": f"images/{i}.jpg", "modality": "X-ray", "patient_id": "7", "case_id": f"MPX{i}"}
            (tmp_path / folder / table).write_text(json.dumps(row) + "\n")
    done = _medclip("data", "planted", "--out", str(tmp_path / "out"), "--root", str(tmp_path))
    assert done.returncode == 2
    assert "patient_id" in one_error_line(done.stderr) and "both" in one_error_line(done.stderr)


def test_planted_refuses_a_row_without_its_patient(tmp_path):
    """A row with no patient_id (case_id) cannot be kept apart from the other side: one line, not a silent pass."""
    for folder, tables in {"covid-cxr": ("train.jsonl", "test.jsonl"), "medpix": ("train.jsonl", "dev.jsonl")}.items():
        (tmp_path / folder).mkdir()
        for i, table in enumerate(tables):
            row = {"image": f"images/{i}.jpg", "modality": "X-ray", "patient_id": "" if i else "7", "case_id": f"M{i}"}
            (tmp_path / folder / table).write_text(json.dumps(row) + "\n")
    done = _medclip("data", "planted", "--out", str(tmp_path / "out"), "--root", str(tmp_path))
    assert done.returncode == 2
    assert one_error_line(done.stderr) == ("medclip: error: covid-cxr: 1 row(s) of test.jsonl have no patient_id: "
                                           "planted findings cannot keep their patients apart from the other side")


def test_planted_refuses_more_findings_per_image_than_kinds(tmp_path):
    """Each image's findings are distinct kinds: asking for more than there are is one line, not a silent cap."""
    done = _medclip("data", "planted", "--out", str(tmp_path / "out"), "--root", str(tmp_path), "--max-findings", "6")
    assert done.returncode == 2
    assert one_error_line(done.stderr) == ("medclip: error: planted findings need --max-findings from 1 to 5 (the "
                                           "kinds of finding: nodule, mass, consolidation, cyst, fracture), got 6")


def test_a_demo_set_of_the_other_layout_is_not_reused(tmp_path):
    """An output directory's demo set built with one layout is refused, in one line, by a recipe asking for the
    other (a resume with a changed data.demo_layout would otherwise train on the old set)."""
    from medclip.errors import MedclipError
    from medclip.models.registry import get_model_config
    from medclip.training.components import prepare_demo
    from medclip.training.config import load_recipe

    sizes = ["data.demo_train_samples=12", "data.demo_val_samples=6"]
    anatomical = load_recipe("demo", sizes)
    prepare_demo(anatomical, get_model_config(anatomical.model.name), tmp_path, is_main=True)
    prepare_demo(anatomical, get_model_config(anatomical.model.name), tmp_path, is_main=True)  # same layout: reused
    randomised = load_recipe("demo", [*sizes, "data.demo_layout=random"])
    with pytest.raises(MedclipError, match="built with data.demo_layout anatomical, the recipe asks for random"):
        prepare_demo(randomised, get_model_config(randomised.model.name), tmp_path, is_main=True)
