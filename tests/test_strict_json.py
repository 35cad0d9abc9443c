"""Every JSON the CLI writes parses with a strict parser: undefined metrics are null, with the reason."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from medclip import jsonio
from medclip.cli import main


def strict_loads(text: str):
    """json.loads that refuses NaN / Infinity, as JavaScript's JSON.parse does."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _folder(root, classes, per_class=3):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_eval_result_with_a_class_absent_from_the_labels_is_strict_json(tmp_path, capsys):
    data = _folder(tmp_path / "data", ["benign", "malignant"])
    out = tmp_path / "results"
    code = main(["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "image_folder", "--data", str(data),
                 "--classes", "benign", "malignant", "cyst", "--out", str(out), "--workers", "1",
                 "--no-progress", "--no-plots", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    written = sorted(out.rglob("*.json"))
    assert written
    records = [strict_loads(p.read_text()) for p in written]
    record = next(r for r in records if r.get("dataset") == "data")
    # CLIP_benchmark's keys stay; the undefined ones are null and say why
    assert record["metrics"]["acc5"] is None
    assert record["details"]["per_class_auc"][2] is None and record["classnames"][2] == "cyst"
    assert record["undefined"]["metrics.acc5"] == "fewer than 5 classes"
    assert "absent from the labels" in record["undefined"]["details.per_class_auc.cyst"]
    assert all(v is None or math.isfinite(v) for v in record["details"]["per_class_auc"])


def test_convert_and_explain_outputs_are_strict_json(tmp_path, capsys):
    assert main(["convert", "medclip-tiny", str(tmp_path / "export")]) == 0
    image = _folder(tmp_path / "img", ["x"], 1) / "x" / "0.png"
    out_png = tmp_path / "heat.png"
    assert main(["explain", str(image), "--model", str(tmp_path / "export"), "--concepts", "nodule,mass",
                 "-o", str(out_png), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    strict_loads(printed[printed.index("{"):])
    for path in (tmp_path / "export").rglob("*.json"):
        strict_loads(path.read_text())


def test_jsonio_never_writes_nan_or_infinity(tmp_path):
    value = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (np.float64("nan"),)}
    text = jsonio.dumps(value)
    assert strict_loads(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": [None]}
    assert jsonio.non_finite_paths(value) == ["a", "b[1]", "b[2].c", "d[0]"]
    with pytest.raises(ValueError):
        strict_loads(json.dumps(value))  # what the plain json module writes is not JSON


# json.dumps calls that write no file a user reads: hash inputs, a subprocess argument, a grouping key.
NOT_WRITTEN = {"medclip/training/prepare.py": 1, "medclip/models/cache.py": 1, "medclip/data/builder.py": 1,
               "medclip/training/rehearsal/checks.py": 1}


def test_every_json_medclip_writes_goes_through_jsonio():
    """A new file or line written with the plain json module (NaN -> bare NaN) fails here."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in (root / "medclip").rglob("*.py"):
        name = path.relative_to(root).as_posix()
        count = len(re.findall(r"\bjson\.dumps?\(", path.read_text()))
        if count and name != "medclip/jsonio.py":
            found[name] = count
    assert found == NOT_WRITTEN


def test_shards_build_summary_and_manifest_are_strict_json(tmp_path, capsys):
    data = _folder(tmp_path / "classes", ["CT", "MRI"])
    templates = tmp_path / "t.json"
    templates.write_text('["a scan showing {}"]')
    out = tmp_path / "shards"
    assert main(["shards", "build", str(data), "--format", "folder", "--templates", str(templates),
                 "--out", str(out), "--prefix", "f"]) == 0, capsys.readouterr().err
    written = sorted(out.rglob("*.json"))
    assert written
    for path in written:
        strict_loads(path.read_text())
