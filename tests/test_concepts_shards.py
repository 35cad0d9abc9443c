"""Concept spans survive the round trip into shards (JSONL, tar in place) and onto token positions."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from medclip.cli import main as cli_main
from medclip.concepts import (
    ConceptAnnotator,
    annotate_jsonl,
    annotate_shard,
    char_to_token_spans,
    load_vocabulary,
)
from medclip.concepts.shards import iter_shard_samples
from medclip.errors import MedclipError

VOCAB = "id\tname\tsynonyms\nC1\tPleural effusion\t\nC2\tCardiomegaly\tenlarged heart\nC3\tLung\t\n"


@pytest.fixture
def vocab_path(tmp_path):
    path = tmp_path / "vocab.tsv"
    path.write_text(VOCAB)
    return path


@pytest.fixture
def annotator(vocab_path):
    return ConceptAnnotator(load_vocabulary(vocab_path))


def write_shard(path, samples):
    """A WebDataset shard: KEY.jpg, KEY.json, KEY.txt per sample, in that order."""
    with tarfile.open(path, "w") as tar:
        for key, record, caption in samples:
            for ext, data in (("jpg", b"\xff\xd8fake"), ("json", json.dumps(record).encode()),
                              ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 1_700_000_000
                tar.addfile(info, io.BytesIO(data))


def test_jsonl_round_trip(tmp_path, annotator):
    src = tmp_path / "in.jsonl"
    rows = [{"caption": "Enlarged heart, no pleural effusion.", "id": 1}, {"id": 2},
            {"caption": ["lung", "Cardiomegaly"], "id": 3}]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = annotate_jsonl(src, tmp_path / "out.jsonl", annotator)
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert stats.records == 3 and stats.annotated == 2 and stats.negated == 1 and sum(stats.skipped.values()) == 1
    first = out[0]
    assert [(first["caption"][m["start"]:m["end"]], m["cui"], m["negated"]) for m in first["concepts"]] == [
        ("Enlarged heart", "C2", False), ("pleural effusion", "C1", True)]
    assert "concepts" not in out[1] and out[1] == {"id": 2}
    assert [(m["caption_index"], m["cui"]) for m in out[2]["concepts"]] == [(0, "C3"), (1, "C2")]


def test_shard_annotated_in_place_and_read_back(tmp_path, annotator):
    shard = tmp_path / "shard-000000.tar"
    write_shard(shard, [
        ("000000", {"captions": ["Cardiomegaly.", "Enlarged heart and lung nodules"], "source": "t"}, "Cardiomegaly."),
        ("000001", {"source": "t"}, "No pleural effusion."),  # captions from the .txt
        ("000002", {"captions": [], "source": "t"}, ""),
    ])
    before = [m.name for m in tarfile.open(shard)]
    stats = annotate_shard(shard, annotator)
    assert [m.name for m in tarfile.open(shard)] == before  # same members, same order
    assert list(tmp_path.glob(".*tmp")) == []  # the temp file was renamed over the shard
    samples = {s["key"]: s for s in iter_shard_samples(shard)}
    assert samples["000000"]["image"] == b"\xff\xd8fake"
    first = samples["000000"]["json"]
    assert [(first["captions"][m["caption_index"]][m["start"]:m["end"]], m["cui"]) for m in first["concepts"]] == [
        ("Cardiomegaly", "C2"), ("Enlarged heart", "C2"), ("lung", "C3")]
    second = samples["000001"]["json"]["concepts"]
    assert [(m["cui"], m["negated"], m["caption_index"]) for m in second] == [("C1", True, 0)]
    assert "concepts" not in samples["000002"]["json"]
    assert stats.annotated == 2 and stats.skipped == {"without captions": 1}
    again = annotate_shard(shard, annotator)  # existing concepts are kept unless overwrite
    assert again.annotated == 0 and sum(again.skipped.values()) == 3


def test_corrupt_shard_is_an_error_and_left_untouched(tmp_path, annotator):
    shard = tmp_path / "bad.tar"
    shard.write_bytes(b"this is not a tar file" * 40)
    before = shard.read_bytes()
    with pytest.raises(MedclipError, match="cannot read shard"):
        annotate_shard(shard, annotator)
    assert shard.read_bytes() == before and list(tmp_path.glob(".*tmp")) == []
    broken_json = tmp_path / "json.tar"
    with tarfile.open(broken_json, "w") as tar:
        info = tarfile.TarInfo("k.json")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"{oops"))
    with pytest.raises(MedclipError, match="not valid JSON"):
        annotate_shard(broken_json, annotator)


CAPTION = "Findings: no pleural effusion;  enlarged heart (cardiomegaly) and clear lung."


@pytest.mark.parametrize("fixture", ["tiny_encoder", "tiny_bert_encoder"])
def test_spans_map_onto_token_positions(request, fixture, annotator):
    tokenizer = request.getfixturevalue(fixture).tokenizer
    mentions = annotator.annotate(CAPTION)
    assert [CAPTION[m["start"]:m["end"]] for m in mentions] == [
        "pleural effusion", "enlarged heart", "cardiomegaly", "lung"]
    token_spans = char_to_token_spans(tokenizer, CAPTION, [(m["start"], m["end"]) for m in mentions])
    ids = tokenizer([CAPTION])[0].tolist()
    hf = getattr(tokenizer, "tokenizer", None)
    for mention, (start, end) in zip(mentions, token_spans):
        piece = ids[start:end]
        text = hf.decode(piece) if hf is not None else tokenizer.decode(piece)
        assert text.replace(" ", "") == CAPTION[mention["start"]:mention["end"]].lower().replace(" ", "")
    assert token_spans[0][0] > 1  # position 0 is the start token, "findings : no" come first


def test_token_spans_truncated_by_the_context(tiny_encoder):
    caption = "lung " * 100 + "pleural effusion"
    spans = char_to_token_spans(tiny_encoder.tokenizer, caption, [(0, 4), (500, 516)])
    assert spans[0] == (1, 2) and spans[1] is None  # past the 64-token context
    with pytest.raises(MedclipError, match="outside the caption"):
        char_to_token_spans(tiny_encoder.tokenizer, caption, [(5, 1000)])


def test_cli_annotate_jsonl_and_shard(tmp_path, vocab_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "enlarged heart"}) + "\n")
    assert cli_main(["concepts", "annotate", "--vocab", str(vocab_path), "--field", "text", str(src),
                     "-o", str(tmp_path / "out.jsonl")]) == 0
    assert json.loads((tmp_path / "out.jsonl").read_text())["concepts"][0]["cui"] == "C2"
    shard = tmp_path / "s.tar"
    write_shard(shard, [("a", {"captions": ["lung"]}, "lung")])
    assert cli_main(["concepts", "annotate", "--vocab", str(vocab_path), str(shard)]) == 0
    assert next(iter_shard_samples(shard))["json"]["concepts"][0]["cui"] == "C3"
    assert cli_main(["concepts", "annotate", "--vocab", str(vocab_path), str(src)]) == 2  # no -o
    assert "give -o" in capsys.readouterr().err


def test_scispacy_linker_is_optional(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "spacy", None)  # as if scispaCy were not installed
    from medclip.concepts.scispacy_linker import ScispacyAnnotator

    with pytest.raises(MedclipError, match="pip install scispacy"):
        ScispacyAnnotator()
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"caption": "lung"}) + "\n")
    assert cli_main(["concepts", "annotate", "--scispacy-model", "en_core_sci_sm", str(src), "-o",
                     str(tmp_path / "o.jsonl")]) == 2
    assert cli_main(["concepts", "annotate", str(src), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "give --vocab" in capsys.readouterr().err
