"""`medclip data leakage` and the recipe preflight `data.leakage_check`, on real MedPix / COVID-19 images."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_error_line  # tests/ is on sys.path under pytest
from PIL import Image

LEAK = re.compile(r"^LEAK (exact|near) (?:identical bytes|distance (\d+)): (\S+) ~ (\S+)")


def _medclip(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medclip", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _rows(path: Path, n: int, skip: int = 0) -> list[Path]:
    lines = path.read_text().splitlines()[skip:skip + n]
    return [path.parent / json.loads(line)["image"] for line in lines]


def _crop(img: Image.Image, share: float) -> Image.Image:
    """``share`` of each side removed, half from each end."""
    w, h = img.size
    dx, dy = round(w * share / 2), round(h * share / 2)
    return img.crop((dx, dy, w - dx, h - dy))


@pytest.fixture
def planted(tmp_path, shared_data):
    """Evaluation folder: 8 real images (MedPix dev CT/MRI, COVID-19 test X-rays). Training folder: a resized
    (0.5x), a re-encoded (JPEG quality 60) and a cropped (3 %) copy of each, plus 12 unrelated real images."""
    originals = _rows(shared_data / "medpix" / "dev.jsonl", 4) + _rows(shared_data / "covid-cxr" / "test.jsonl", 4)
    unrelated = _rows(shared_data / "medpix" / "train.jsonl", 6, skip=100) + \
        _rows(shared_data / "covid-cxr" / "train.jsonl", 6, skip=100)
    eval_dir, train_dir = tmp_path / "eval", tmp_path / "train"
    eval_dir.mkdir()
    train_dir.mkdir()
    expected = {}
    for i, path in enumerate(originals):
        img = Image.open(path).convert("RGB")
        img.save(eval_dir / f"orig{i}.png")
        img.resize((img.width // 2, img.height // 2), Image.BICUBIC).save(train_dir / f"resized{i}.jpg", quality=90)
        img.save(train_dir / f"reencoded{i}.jpg", quality=60)
        _crop(img, 0.03).save(train_dir / f"cropped{i}.jpg", quality=90)
        for kind in ("resized", "reencoded", "cropped"):
            expected[f"{kind}{i}.jpg"] = f"orig{i}.png"
    for i, path in enumerate(unrelated):
        Image.open(path).convert("RGB").save(train_dir / f"unrelated{i}.jpg", quality=90)
    return train_dir, eval_dir, expected


def test_leakage_finds_every_planted_copy_and_no_unrelated_image(planted):
    train_dir, eval_dir, expected = planted
    proc = _medclip("data", "leakage", str(train_dir), "--against", str(eval_dir), "--workers", "2")
    assert proc.returncode == 1, proc.stderr  # leakage found
    found = {}
    for line in proc.stdout.splitlines()[:-1]:
        match = LEAK.match(line)
        assert match, line
        train_key, eval_key = match[3].rsplit(":", 1)[1], match[4].rsplit(":", 1)[1]
        found[train_key] = eval_key
        assert match[2] is None or int(match[2]) <= 8
    assert found == expected  # every planted copy, matched to its original; no unrelated image
    assert proc.stdout.splitlines()[-1].startswith(f"{len(expected)} training images match evaluation images")


def test_leakage_exact_copy_and_clean_result(planted, tmp_path):
    train_dir, eval_dir, _ = planted
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "same.png").write_bytes((eval_dir / "orig0.png").read_bytes())
    proc = _medclip("data", "leakage", str(copy), "--against", str(eval_dir), "--workers", "1")
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"LEAK exact identical bytes: {copy}:same.png ~ {eval_dir}:orig0.png")
    clean = tmp_path / "clean"
    clean.mkdir()
    for p in sorted(train_dir.glob("unrelated*.jpg")):
        (clean / p.name).write_bytes(p.read_bytes())
    proc = _medclip("data", "leakage", str(clean), "--against", str(eval_dir), "--workers", "1")
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("no leakage found: 12 training images against 8 evaluation images")


def test_leakage_on_an_empty_folder_is_one_line(tmp_path, planted):
    _, eval_dir, _ = planted
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = _medclip("data", "leakage", str(empty), "--against", str(eval_dir))
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == f"medclip: error: {empty}: the folder holds no images"


def test_recipe_refuses_to_start_on_leakage_unless_allowed(planted, tmp_path):
    """A recipe's data.leakage_check runs before step 1 on the shards it built, and stops the run in one line."""
    train_dir, eval_dir, _ = planted
    table = train_dir / "train.jsonl"
    table.write_text("".join(json.dumps({"image": p.name, "caption": "a medical image."}) + "\n"
                             for p in sorted(train_dir.glob("*.jpg"))))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""
model: {{name: medclip-tiny}}
data:
  build: [{{name: planted, input: {table}, max_side: 128}}]
  batch_size: 8
  num_workers: 1
  leakage_check: {{against: [{eval_dir}]}}
run: {{output_dir: {tmp_path / 'run'}, steps: 1, tensorboard: false, progress: false}}
""")
    proc = _medclip("pretrain", "--config", str(recipe))
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith("medclip: error: the run cannot start: 24 training images match evaluation images "
                           "(first: "), line
    assert "data.leakage_check.allow_leakage: true" in line
    assert not list((tmp_path / "run").glob("**/step_*.pt"))
    proc = _medclip("pretrain", "--config", str(recipe), "--set", "data.leakage_check.allow_leakage=true",
                    "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "training anyway" in proc.stderr


def test_shards_against_a_suite(tmp_path, shared_data):
    """Training shards (streamed, as `shards build` writes them) against a suite's scored split; a probe's
    `train` split of the suite is not an evaluation image."""
    dev = _rows(shared_data / "medpix" / "dev.jsonl", 3)
    unrelated = _rows(shared_data / "medpix" / "train.jsonl", 3, skip=200)
    images = tmp_path / "train"
    images.mkdir()
    rows = []
    for i, path in enumerate(dev + unrelated):
        img = Image.open(path).convert("RGB")
        name = f"{'copy' if i < 3 else 'other'}{i}.jpg"
        (img.resize((img.width // 2, img.height // 2)) if i < 3 else img).save(images / name, quality=85)
        rows.append(json.dumps({"image": name, "caption": "an image."}) + "\n")
    (images / "train.jsonl").write_text("".join(rows))
    build = _medclip("shards", "build", str(images / "train.jsonl"), "--out", str(tmp_path / "shards"),
                     "--prefix", "planted", "--no-shuffle")
    assert build.returncode == 0, build.stderr
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"""suite: s
root: {shared_data}
datasets:
  - {{name: modality, reader: jsonl, args: {{path: medpix/dev.jsonl}}, label: modality, classes: [CT, MRI],
     templates: ["a {{c}}."]}}
  - {{name: probe, task: linear-probe, reader: jsonl, args: {{path: medpix/dev.jsonl}}, label: modality,
     classes: [CT, MRI], train: {{reader: jsonl, args: {{path: medpix/train.jsonl}}}}}}
""")
    proc = _medclip("data", "leakage", str(tmp_path / "shards" / "planted-*.tar"), "--against", str(suite),
                    "--workers", "1")
    assert proc.returncode == 1, proc.stderr
    found = sorted(LEAK.match(line)[4] for line in proc.stdout.splitlines()[:-1])
    assert found == sorted(f"medpix/dev.jsonl:{p.relative_to(p.parent.parent)}" for p in dev)
    assert "6 training images against 197 evaluation images" in proc.stdout.splitlines()[-1]
