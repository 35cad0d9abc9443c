"""Builds own their output; files as users save them (Excel CSVs, other encodings, hidden entries)."""

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
from medclip.data import builder
from medclip.data.build_output import listing
from medclip.data.manifest import check_manifest, load_manifest
from medclip.data.shards import sha256_file
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


# ------------------------------------------------------------------------------ builds own their output


def test_a_rebuild_replaces_the_earlier_shards_and_a_failed_one_keeps_them(tmp_path, capsys):
    rows = _medpix_rows(30)
    out = tmp_path / "stale"
    code, _, _ = _build(capsys, _jsonl(tmp_path / "mp30.jsonl", rows), out, "--prefix", "s", "--max-samples", "10")
    assert code == 0 and len(list(out.glob("s-*.tar"))) == 3
    code, stdout, _ = _build(capsys, _jsonl(tmp_path / "mp5.jsonl", rows[:5]), out, "--prefix", "s",
                             "--max-samples", "10", "--processes", "2")
    assert code == 0 and "removed s-000001.tar, s-000002.tar" in stdout
    # no staging folder left; the whole build's manifest names its shards
    assert sorted(p.name for p in out.iterdir()) == ["s-000000.tar", "s-summary.json", "s.yaml"]
    assert load_manifest(out / "s.yaml").samples == 5 and check_manifest(load_manifest(out / "s.yaml")) == []
    summary = json.loads((out / "s-summary.json").read_text())
    assert [s["name"] for s in summary["shards"]] == ["s-000000.tar"] and summary["samples"] == 5
    assert len(read_dataset("wds", out, path="s-*.tar")) == 5  # the evaluation the issue ran
    assert sha256_file(out / "s-000000.tar") == summary["shards"][0]["sha256"]
    assert listing([f"s-{i:06d}.tar" for i in range(7)]) == ("s-000000.tar, s-000001.tar, s-000002.tar, "
                                                              "s-000003.tar, s-000004.tar, ... (7 in all)")

    # A build that writes nothing fails in one line with its reasons counted, and changes nothing.
    before = {p.name: sha256_file(p) for p in out.iterdir()}
    missing = _jsonl(tmp_path / "missing.jsonl", [{**r, "image": "nope.jpg"} for r in rows[:4]] + [{"x": 1}])
    code, _, err = _build(capsys, missing, out, "--prefix", "s")
    assert code == 2
    line = one_error_line(err)
    assert "no sample written: all 5 input(s) were skipped (missing_image 5)" in line
    assert f"{missing}:1: image not found" in line and f"{out} is left as it was" in line
    assert {p.name: sha256_file(p) for p in out.iterdir()} == before
    assert _build(capsys, _jsonl(tmp_path / "empty.jsonl", []), tmp_path / "new", "--prefix", "s")[0] == 2


def test_part_builds_replace_only_their_own_part(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(builder, "PART_BLOCK", 4)  # 10 rows: part 0/3 gets rows 0-3, 1/3 rows 4-7, 2/3 rows 8-9
    rows = _medpix_rows(10)
    table = _jsonl(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "parts"

    def build_part(part: str) -> tuple[int, str, str]:
        return _build(capsys, table, out, "--prefix", "p", "--part", part, "--max-samples", "2")

    assert [build_part(f"{i}/3")[0] for i in range(3)] == [0, 0, 0]
    assert cli_main(["shards", "merge", str(out), "--prefix", "p"]) == 0
    part1 = {p.name: sha256_file(p) for p in [*out.glob("p-001-*"), out / "p-summary-001.json"]}
    assert len(part1) == 2 + 1  # two shards of two samples, and the part's summary

    # The table edited (two images gone, the last rows dropped) and parts 0 and 2 built again: part 0's
    # extra shard and the stale merge go, part 2 (now given no rows) empties, part 1 is left alone
    _jsonl(table, [{**r, "image": "nope.jpg"} for r in rows[:2]] + rows[2:8])
    code, stdout, _ = build_part("0/3")
    assert code == 0 and "p-000-00001.tar" in stdout and "p.yaml" in stdout and "p-summary.json" in stdout
    assert build_part("2/3")[0] == 0
    assert {p.name: sha256_file(p) for p in [*out.glob("p-001-*"), out / "p-summary-001.json"]} == part1
    assert sorted(p.name for p in out.glob("p-*.tar")) == ["p-000-00000.tar", "p-001-00000.tar", "p-001-00001.tar"]
    assert not (out / "p.yaml").exists() and not (out / "p-summary.json").exists()
    assert cli_main(["shards", "merge", str(out), "--prefix", "p"]) == 0
    merged = load_manifest(out / "p.yaml")
    assert merged.samples == 6 and check_manifest(merged) == []

    # A whole build into the same folder and prefix replaces the whole part collection
    assert _build(capsys, table, out, "--prefix", "p")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["p-000000.tar", "p-summary.json", "p.yaml"]
    # and a part build replaces a whole build (its shards are no part's, nor its manifest)
    assert _build(capsys, table, out, "--prefix", "p", "--part", "1/2")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["p-001-00000.tar", "p-summary-001.json"]


def test_recipe_data_build_replaces_its_stale_build_only_when_the_new_one_is_complete(tmp_path):
    from medclip.training.prepare import BuildSpec, build_source

    table = _jsonl(tmp_path / "rows.jsonl", _medpix_rows(3))
    spec = BuildSpec(name="mini", input=str(table), max_side=32)
    manifest = build_source(spec, tmp_path / "shards")
    kept = {p.name: sha256_file(p) for p in manifest.parent.iterdir()}
    _jsonl(table, [{"image": "nope.jpg", "caption": "x"}])
    with pytest.raises(MedclipError, match=r"data.build mini .*no sample written: all 1 input\(s\) were skipped"):
        build_source(spec, tmp_path / "shards")
    assert {p.name: sha256_file(p) for p in manifest.parent.iterdir()} == kept


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
    out = tmp_path / "out"
    assert _build(capsys, _jsonl(tmp_path / "good.jsonl", rows[:2]), out)[0] == 0
    kept = {p.name: sha256_file(p) for p in out.iterdir()}
    for table, line, char in ((latin, 5, "é"), (tmp_path / "cp1252.jsonl", 3, "ï")):
        code, _, err = _build(capsys, table, out, "--processes", "2", "--max-samples", "1")  # after 2+ shards
        assert code == 2
        message = one_error_line(err)
        assert message.startswith(f"medclip: error: {table}:{line}: byte ") and f"it would be '{char}'" in message
        assert "save it as UTF-8" in message
        assert {p.name: sha256_file(p) for p in out.iterdir()} == kept  # the earlier build, untouched

    _csv(tmp_path / "eval.csv", ["path", "label"], [[r["image"], "caf\xe9" if i == 1 else "x"]
                                                    for i, r in enumerate(rows)], "cp1252")
    with pytest.raises(MedclipError, match=r"eval.csv:3: byte 0xe9 .* save it as UTF-8 \(Excel"):
        read_dataset("csv", tmp_path, path="eval.csv")
    (tmp_path / "eval.jsonl").write_bytes(b'{"image": "a.png"}\n{"image": "\xe9.png"}\n')
    with pytest.raises(MedclipError, match=r"eval.jsonl:2: byte 0xe9 .* save it as UTF-8$"):
        read_dataset("jsonl", tmp_path, path="eval.jsonl")
    (tmp_path / "utf16.csv").write_bytes(codecs.BOM_UTF16_LE + "image,caption\r\n".encode("utf-16-le"))
    code, _, err = _build(capsys, tmp_path / "utf16.csv", out)
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
