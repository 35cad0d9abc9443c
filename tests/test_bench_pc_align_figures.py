"""bench/pc_align_value.py's figure of one held-out image per finding (README, issue 28 item 5)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from engine_helpers import load_bench

from medclip.concepts.grounding import evaluate_grounding, grounding_records_from_shards
from medclip.data.demo import CUIS


def test_findings_figure_shows_each_finding_once_with_its_own_box_and_pointing_result(tmp_path):
    import medclip
    from medclip.models.export import save

    figures = load_bench("_pc_align_figures.py")
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "medclip", "data", "demo", "--out", str(run / "demo_data"),
                           "--n-train", "10", "--n-val", "120", "--image-size", "64", "--layout", "random"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    panels = figures.first_per_finding(run / "demo_data")
    names = [name for _, name, _ in panels]
    assert names == [c for c in CUIS if c in names] and len(names) == len(set(names)) >= 6
    for sample, name, box in panels:
        assert {"name": name, "bbox": box} in [{"name": b["name"], "bbox": b["bbox"]} for b in sample.boxes]

    torch.manual_seed(0)
    save(medclip.load("medclip-tiny", device="cpu"), run / "export")
    hits = figures.render_findings_figure(run, tmp_path / "findings.png")
    assert (tmp_path / "findings.png").stat().st_size > 10_000
    # The panels' hit labels are the bench table's: the library's grounding evaluation of the same boxes.
    encoder = medclip.load(str(run / "export"), device="cpu")
    records = grounding_records_from_shards(sorted((run / "demo_data").glob("demo-val-*.tar")))
    scored = {(r["key"], r["concept"]): r["hit"] for r in evaluate_grounding(encoder, records).per_record}
    assert hits == [scored[(sample.key, name)] for sample, name, _ in panels]
    # At a stride too (the figure the README shows is drawn every 2 px).
    hits = figures.render_findings_figure(run, tmp_path / "findings-stride.png", stride=4)
    scored = {(r["key"], r["concept"]): r["hit"] for r in evaluate_grounding(encoder, records, stride=4).per_record}
    assert hits == [scored[(sample.key, name)] for sample, name, _ in panels]


def test_a_stride_that_does_not_divide_the_patch_stops_the_bench_before_training(tmp_path, capsys):
    bench = load_bench("pc_align_value.py")
    with pytest.raises(SystemExit) as stop:
        bench.main(["--stride", "3", "--seeds", "0", "--report-only", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and "--stride must divide the demo model's 8-pixel patch, got 3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing built, nothing trained
