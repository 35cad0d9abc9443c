"""Outputs never overwrite inputs: explain -o, convert OUT and eval --out refuse, in one line, without --force."""

from __future__ import annotations

import numpy as np
from conftest import one_error_line  # tests/ is on sys.path under pytest
from PIL import Image

from medclip.cli import main

TINY = ["--device", "cpu"]


def _image(path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(path)
    return path


def test_explain_refuses_to_write_its_heatmap_onto_the_input_image(tmp_path, capsys):
    victim = _image(tmp_path / "victim.jpg")
    before = victim.read_bytes()
    for spelled in (str(victim), str(tmp_path / "." / "victim.jpg")):
        assert main(["explain", str(victim), "--model", "medclip-tiny", "--concepts", "mass", "-o", spelled,
                     *TINY]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "is the input" in line and "--force" in line
    assert victim.read_bytes() == before
    assert main(["explain", str(victim), "--model", "medclip-tiny", "--concepts", "mass", "-o", str(victim),
                 "--force", *TINY]) == 0  # asked for explicitly
    assert victim.read_bytes() != before


def test_convert_refuses_a_foreign_folder_and_its_own_source(tmp_path, capsys):
    foreign = tmp_path / "papers"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["convert", "medclip-tiny", str(foreign)]) == 2
    assert "is not empty and is not an earlier 'medclip convert' output" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    out = tmp_path / "export"
    assert main(["convert", "medclip-tiny", str(out)]) == 0
    assert main(["convert", "medclip-tiny", str(out)]) == 0  # an earlier convert output: rewritten
    capsys.readouterr()
    assert main(["convert", f"local-dir:{out}", str(out)]) == 2  # onto its own source
    assert "overlaps the input" in one_error_line(capsys.readouterr().err)
    assert main(["convert", "medclip-tiny", str(foreign), "--force"]) == 0
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "open_clip_config.json").is_file()


def test_eval_out_refuses_the_data_folder_and_foreign_folders(tmp_path, capsys):
    data = tmp_path / "data"
    for c in ("benign", "malignant"):
        (data / c).mkdir(parents=True)
        _image(data / c / "a.png")
    args = ["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "image_folder", "--data", str(data),
            "--classes", "benign", "malignant", "--workers", "1", "--no-progress", "--no-plots", *TINY]
    assert main([*args, "--out", str(data)]) == 2  # results and plots would become classes of the data
    assert "overlaps the input" in one_error_line(capsys.readouterr().err)
    assert main([*args, "--out", str(data / "results")]) == 2
    capsys.readouterr()
    assert sorted(p.name for p in data.iterdir()) == ["benign", "malignant"]
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "chapter1.tex").write_text("x")
    assert main([*args, "--out", str(foreign)]) == 2
    assert "not an earlier 'medclip eval' output" in one_error_line(capsys.readouterr().err)
    out = tmp_path / "results"
    assert main([*args, "--out", str(out)]) == 0
    assert main([*args, "--out", str(out)]) == 0  # a re-run into its own output folder
