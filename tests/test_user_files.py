"""Files as users save them (Excel CSVs, other encodings, hidden entries)."""

from __future__ import annotations

import codecs
import csv
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from conftest import one_error_line, require_shared  # tests/ is on sys.path under pytest

from medclip.cli import main as cli_main
from medclip.errors import MedclipError
from medclip.evaluation import read_dataset


def _medpix_rows(n: int) -> list[dict]:
    src = require_shared("medpix", "dev.jsonl")
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    return [{**r, "image": str(src.parent / r["image"])} for r in rows]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, header: list[str], rows: list[list], encoding: str = "utf-8-sig") -> Path:
    """As Excel saves it: CRLF line ends; "CSV UTF-8" starts with a byte-order mark (utf-8-sig)."""
    with open(path, "w", newline="", encoding=encoding) as f:
        csv.writer(f).writerows([header, *rows])
    return path


def _build(capsys, table: Path, out: Path, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli_main(["shards", "build", str(table), "--out", str(out), "--max-side", "32", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _tar_metas(folder: Path, pattern: str = "*.tar") -> list[dict]:
    metas = []
    for shard in sorted(folder.glob(pattern)):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith(".json")]
    return metas


# ------------------------------------------------------------------------------ tables as users save them


def test_an_excel_csv_utf8_builds_every_row(tmp_path, capsys):
    rows = _medpix_rows(5)
    table = _csv(tmp_path / "excel.csv", ["image", "caption", "modality"],
                 [[r["image"], r["caption"] + " café", r["modality"]] for r in rows])
    assert table.read_bytes().startswith(codecs.BOM_UTF8)
    code, stdout, _ = _build(capsys, table, tmp_path / "out", "--processes", "2")
    assert code == 0 and stdout.startswith("wrote 5 samples in 1 shards")
    metas = _tar_metas(tmp_path / "out")
    assert len(metas) == 5 and all(m["captions"][0].endswith(" café") for m in metas)
    assert [m["modality"] for m in metas] == [r["modality"] for r in rows]

    # A table without the image column says so, with the columns it has
    other = _csv(tmp_path / "other.csv", ["file", "caption"], [[r["image"], r["caption"]] for r in rows])
    code, _, err = _build(capsys, other, tmp_path / "out2")
    assert code == 2
    assert one_error_line(err).endswith(f"{other} has no 'image' column (its columns: 'file', 'caption')")


def test_the_evaluator_reads_tables_saved_with_a_byte_order_mark(tmp_path, capsys):
    rows = _medpix_rows(6)
    table = _csv(tmp_path / "eval.csv", ["path", "modality"], [[r["image"], r["modality"]] for r in rows])
    data = read_dataset("csv", tmp_path, path="eval.csv")
    assert len(data) == 6 and [x["modality"] for x in data.labels] == [r["modality"] for r in rows]
    (tmp_path / "eval.jsonl").write_bytes(codecs.BOM_UTF8 + _jsonl(tmp_path / "x", rows).read_bytes())
    assert [c for c in read_dataset("jsonl", tmp_path, path="eval.jsonl").captions] == [[r["caption"].strip()]
                                                                                       for r in rows]
    capsys.readouterr()
    assert cli_main(["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "csv", "--data", str(table),
                     "--label", "modality", "--classes", "CT", "MRI", "--template", "a {c} scan",
                     "--out", str(tmp_path / "res"), "--device", "cpu", "--workers", "2", "--no-plots",
                     "--no-progress"]) == 0
    assert "(n=6, skipped=0)" in capsys.readouterr().out
    _csv(tmp_path / "nopath.csv", ["image", "modality"], [[r["image"], r["modality"]] for r in rows])
    with pytest.raises(MedclipError, match=r"nopath.csv has no 'path' column \(its columns: 'image', 'modality'\)"):
        read_dataset("csv", tmp_path, path="nopath.csv")


def test_tables_in_other_encodings_are_one_line_naming_file_and_line(tmp_path, capsys):
    rows = _medpix_rows(5)
    latin = _csv(tmp_path / "cp1252.csv", ["image", "caption"],
                 [[r["image"], r["caption"] + (" café" if i == 3 else "")] for i, r in enumerate(rows)], "cp1252")
    (tmp_path / "cp1252.jsonl").write_bytes("".join(
        json.dumps({**r, "caption": r["caption"] + (" naïve" if i == 2 else "")}, ensure_ascii=False) + "\n"
        for i, r in enumerate(rows)).encode("cp1252"))
    for table, line, char in ((latin, 5, "é"), (tmp_path / "cp1252.jsonl", 3, "ï")):
        code, _, err = _build(capsys, table, tmp_path / "out")
        assert code == 2
        message = one_error_line(err)
        assert message.startswith(f"medclip: error: {table}:{line}: byte ") and f"it would be '{char}'" in message
        assert "save it as UTF-8" in message
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())

    _csv(tmp_path / "eval.csv", ["path", "label"], [[r["image"], "caf\xe9" if i == 1 else "x"]
                                                    for i, r in enumerate(rows)], "cp1252")
    with pytest.raises(MedclipError, match=r"eval.csv:3: byte 0xe9 .* save it as UTF-8 \(Excel"):
        read_dataset("csv", tmp_path, path="eval.csv")
    (tmp_path / "eval.jsonl").write_bytes(b'{"image": "a.png"}\n{"image": "\xe9.png"}\n')
    with pytest.raises(MedclipError, match=r"eval.jsonl:2: byte 0xe9 .* save it as UTF-8$"):
        read_dataset("jsonl", tmp_path, path="eval.jsonl")
    (tmp_path / "utf16.csv").write_bytes(codecs.BOM_UTF16_LE + "image,caption\r\n".encode("utf-16-le"))
    code, _, err = _build(capsys, tmp_path / "utf16.csv", tmp_path / "out")
    assert code == 2 and one_error_line(err).endswith("utf16.csv is UTF-16 text: save it as UTF-8 "
                                                      "(Excel: Save As > 'CSV UTF-8')")


# ------------------------------------------------------------------------------ folders as users leave them


def test_hidden_and_junk_entries_are_no_class_or_image(tmp_path, capsys):
    rows = _medpix_rows(6)
    root = tmp_path / "folder"
    for i, r in enumerate(rows):
        (root / ("CT" if i % 2 == 0 else "MRI")).mkdir(parents=True, exist_ok=True)
        shutil.copy(r["image"], root / ("CT" if i % 2 == 0 else "MRI") / f"{i}.jpg")
    for junk in (".hidden/x.jpg", "__MACOSX/CT/._0.jpg", "CT/._0.jpg", "CT/.DS_Store", "CT/Thumbs.db",
                 "MRI/.cache/y.jpg"):
        (root / junk).parent.mkdir(parents=True, exist_ok=True)
        (root / junk).write_bytes(b"\x00\x05\x16\x07 not an image")
    shutil.copy(rows[0]["image"], root / ".hidden" / "real.jpg")  # a real image in a hidden folder: still not a class
    (tmp_path / "templates.txt").write_text("a {} scan\n")
    code, stdout, _ = _build(capsys, root, tmp_path / "out", "--format", "folder", "--templates",
                             str(tmp_path / "templates.txt"), "--processes", "2")
    assert code == 0 and stdout.startswith("wrote 6 samples") and "skipped" not in stdout
    assert sorted(m["labels"]["class"] for m in _tar_metas(tmp_path / "out")) == ["CT"] * 3 + ["MRI"] * 3
    data = read_dataset("image_folder", tmp_path, path="folder")
    assert sorted(x["label"] for x in data.labels) == ["CT"] * 3 + ["MRI"] * 3
    assert sorted(data.keys) == ["CT/0.jpg", "CT/2.jpg", "CT/4.jpg", "MRI/1.jpg", "MRI/3.jpg", "MRI/5.jpg"]
