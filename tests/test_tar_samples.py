"""One shard reader: every reader groups a shard into the same samples by webdataset's key rule, and
evaluation keeps references to the images of a shard, not their bytes."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import one_error_line  # tests/ is on sys.path under pytest
from PIL import Image

from medclip.cli import main
from medclip.concepts.shards import iter_shard_samples
from medclip.data.manifest import Manifest, count_tar_samples
from medclip.data.shard_reader import read_shard
from medclip.data.tar_samples import ShardMember
from medclip.errors import MedclipError
from medclip.evaluation import EmbedOptions, EvalModel, read_dataset
from medclip.training.rehearsal.data import shard_keys

# DICOM study UIDs as directories: dots in the path, the sample key ends at the first dot of the file name.
STUDIES = ["1.2.840.113619.2.55", "1.2.840.113619.2.56"]
KEYS = [f"{STUDIES[0]}/0001", f"{STUDIES[0]}/0002", f"{STUDIES[1]}/0001"]
FLAT = ["0001", "0002", "0003"]
FINDINGS = {KEYS[0]: "a", KEYS[1]: "b", KEYS[2]: "a"}
CAPTIONS = {KEYS[0]: "enlarged heart", KEYS[1]: "clear lung", KEYS[2]: "no pleural effusion"}
VOCAB = "id\tname\tsynonyms\nC1\tPleural effusion\t\nC2\tCardiomegaly\tenlarged heart\nC3\tLung\t\n"


def _png(seed: int, side: int = 40) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _shard(path, keys=KEYS):
    """Sample i: KEY.png (image i) and KEY.json (finding and caption of the i-th DICOM-UID key)."""
    with tarfile.open(path, "w") as tar:
        for i, (key, uid_key) in enumerate(zip(keys, KEYS)):
            _add(tar, f"{key}.png", _png(i))
            meta = {"labels": {"finding": FINDINGS[uid_key]}, "captions": [CAPTIONS[uid_key]]}
            _add(tar, f"{key}.json", json.dumps(meta).encode())
    return path


def test_dotted_directories_are_the_same_samples_for_every_reader(tmp_path, capsys):
    shard = _shard(tmp_path / "val-000000.tar")
    # training: the stream's reader, and the sample count of data check / mixing
    samples = list(read_shard(str(shard), lambda i: True, Counter()))
    assert [s["__key__"] for s in samples] == KEYS
    assert [json.loads(s["json"])["labels"]["finding"] for s in samples] == [FINDINGS[k] for k in KEYS]
    assert count_tar_samples(shard) == 3
    # the rehearsal's share check
    assert shard_keys(Manifest("uids", [str(shard)])) == {k: "uids" for k in KEYS}
    # evaluation, as the user runs it (loader worker processes read the images)
    data = read_dataset("wds", tmp_path, path="val-*.tar")
    assert data.keys == KEYS and [row["finding"] for row in data.labels] == [FINDINGS[k] for k in KEYS]
    out = tmp_path / "results"
    assert main(["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "wds", "--data", str(shard),
                 "--label", "finding", "--classes", "a", "b", "--out", str(out), "--workers", "2",
                 "--no-progress", "--no-plots", "--device", "cpu"]) == 0
    record = json.loads(next(out.glob("*/val-000000.json")).read_text())
    assert record["n_samples"] == 3 and record["n_skipped"] == 0
    # concepts: annotated in place, each sample from its own caption
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text(VOCAB)
    assert main(["concepts", "annotate", "--vocab", str(vocab), str(shard)]) == 0
    annotated = list(iter_shard_samples(shard))
    assert [s["key"] for s in annotated] == KEYS
    assert [[m["cui"] for m in s["json"]["concepts"]] for s in annotated] == [["C2"], ["C3"], ["C1"]]
    assert [s["image"] for s in annotated] == [_png(i) for i in range(3)]


def test_evaluation_holds_no_image_bytes_and_embeds_the_same_features(tmp_path, tiny_encoder):
    (tmp_path / "plain").mkdir()
    shard = _shard(tmp_path / "plain" / "s-000.tar", FLAT)
    data = read_dataset("wds", tmp_path / "plain", path="s-*.tar")
    assert all(isinstance(image, ShardMember) for image in data.images)
    held = [x for part in (data.labels, data.captions, data.keys) for x in part if isinstance(x, (bytes, bytearray))]
    assert held == []
    model = EvalModel(tiny_encoder)
    streamed = model.embed_images(data, EmbedOptions(batch_size=2, num_workers=2, prefetch_factor=1))
    from_bytes = EvalModel(tiny_encoder).embed_images([_png(i) for i in range(3)], EmbedOptions(batch_size=2))
    assert torch.equal(streamed, from_bytes)
    # A compressed tar has no member offsets to read by: its image bytes are kept, with the same identity
    # (the feature cache key hashes the image bytes, not where they lie).
    (tmp_path / "gz").mkdir()
    with open(shard, "rb") as src, gzip.open(tmp_path / "gz" / "s-000.tar.gz", "wb") as dst:
        dst.write(src.read())
    packed = read_dataset("wds", tmp_path / "gz", path="s-*.tar.gz")
    assert packed.images == [_png(i) for i in range(3)] and packed.keys == FLAT
    assert packed.identity() == data.identity()
    assert torch.equal(EvalModel(tiny_encoder).embed_images(packed, EmbedOptions(batch_size=2)), streamed)


def test_a_shard_cut_short_is_a_one_line_error_in_evaluation(tmp_path, tiny_encoder):
    shard = _shard(tmp_path / "s-000.tar", FLAT)
    data = read_dataset("wds", tmp_path, path="s-*.tar")
    shard.write_bytes(shard.read_bytes()[:1500])  # cut inside the first image, after it was listed
    with pytest.raises(MedclipError, match="s-000.tar: the shard is shorter than when it was listed"):
        EvalModel(tiny_encoder).embed_images(data, EmbedOptions(num_workers=1, prefetch_factor=1))
    with pytest.raises(MedclipError, match="cannot read shard"):
        read_dataset("wds", tmp_path, path="s-*.tar")


def test_two_images_in_one_sample_are_a_one_line_error(tmp_path, capsys):
    twice = tmp_path / "twice"
    twice.mkdir()
    with tarfile.open(twice / "t-000.tar", "w") as tar:
        for name in ("k.png", "k.json", "k.png"):  # two images of one sample: which one to score?
            _add(tar, name, _png(0) if name.endswith("png") else b"{}")
    assert main(["eval", "zero-shot", "--model", "medclip-tiny", "--reader", "wds", "--data",
                 str(twice / "t-000.tar"), "--label", "finding", "--classes", "a", "b", "--out", str(tmp_path / "o"),
                 "--no-progress", "--no-plots", "--device", "cpu"]) == 2
    assert "k.png: a second .png in one sample" in one_error_line(capsys.readouterr().err)


def test_the_key_rule_is_webdatasets():
    """tar_samples restates webdataset's base_plus_ext (a core install has no webdataset): same keys."""
    from webdataset.tariterators import base_plus_ext

    from medclip.data.tar_samples import split_name

    names = ["a.jpg", "a.seg.png", "dir/a.JSON", "1.2.840.113619.2.55/0001.png", "x.y/z.w/k.tar.gz",
             "noext", "dir.v2/noext", ".hidden.txt", "a./b.c", "d/.e", "k..txt", "__key__.txt"]
    for name in names:
        key, ext = base_plus_ext(name)
        assert split_name(name) == (None if key is None else (key, ext.lower())), name
