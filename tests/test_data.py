"""Data area: builder, manifests, span mapping, streaming (mix, workers, faults, resume), demo set."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_shared  # tests/ is on sys.path under pytest
from engine_helpers import write_shard
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image
from torchvision import transforms

from medclip.cli import main as cli_main
from medclip.data import builder
from medclip.data.builder import BuildConfig, build_shards, read_table
from medclip.data.concepts import concept_key
from medclip.data.demo import CUIS, FINDINGS, MODALITIES, build_demo, iter_demo_split
from medclip.data.images import (
    gray_plane,
    gray_transform,
    normalize_images,
    seeded_augmentation,
    split_transform,
    to_uint8_planes,
)
from medclip.data.manifest import Manifest, check_manifest, load_manifest
from medclip.data.shards import sha256_file
from medclip.data.stream import StreamConfig, build_train_stream
from medclip.data.text import CharSpan, SpanTokenizer
from medclip.errors import MedclipError

TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
AUGMENT = image_transform_v2(PreprocessCfg(size=32), is_train=True)  # open_clip's random training transform


def _subset_jsonl(src: Path, dst: Path, n: int) -> Path:
    """First n rows of a shared JSONL with absolute image paths (the images stay in place)."""
    rows = [json.loads(line) for line in src.read_text().splitlines()[:n]]
    for r in rows:
        r["image"] = str(src.parent / r["image"])
    dst.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    build_demo(out, n_train=240, n_val=60, image_size=48, shard_samples=40)
    return out


def _manifest(folder: Path, prefix: str, weight: float = 1.0, name: str | None = None) -> Manifest:
    urls = sorted(str(p) for p in folder.glob(f"{prefix}-*.tar"))
    return Manifest(name=name or prefix, urls=urls, weight=weight)


def _keys(stream) -> list[str]:
    return [k for batch in stream for k in batch["keys"]]


def test_concept_key_is_stable_and_normalised():
    expected = int.from_bytes(hashlib.blake2b(b"C0032326", digest_size=8).digest(), "big") & ((1 << 63) - 1)
    assert concept_key("C0032326") == expected
    assert concept_key(" c0032326 ") == expected
    assert concept_key("C0032227") != expected


def test_builder_is_deterministic_with_checksums_and_parts(tmp_path, monkeypatch):
    src = _subset_jsonl(require_shared("covid-cxr", "train.jsonl"), tmp_path / "rows.jsonl", 40)
    reports = [build_shards(read_table(src), BuildConfig(tmp_path / f"out{p}", prefix="cxr", max_samples=12,
                                                         max_side=64, processes=p)) for p in (1, 2)]
    a, b = reports
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert len(a.shards) >= 2 and all(s.samples <= 12 for s in a.shards)
    for s in a.shards:
        assert sha256_file(tmp_path / "out1" / s.name) == s.sha256
    summary = json.loads(a.summary_path.read_text())
    assert summary["samples"] == a.samples == 40 - a.skipped.get("missing_caption", 0)
    assert {i["kind"] for i in summary["skipped_items"]} <= {"missing_caption"}
    with tarfile.open(tmp_path / "out1" / a.shards[0].name) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(names[1]).read())
        stored = Image.open(io.BytesIO(tar.extractfile(names[0]).read()))
        text = tar.extractfile(names[2]).read().decode()
    assert names[0].endswith(".jpg") and names[1].endswith(".json") and names[2].endswith(".txt")
    # the first sample is the row its key names (rows are permuted): its labels, caption, image shrunk to 64 px
    row = json.loads(src.read_text().splitlines()[int(names[0].split(".")[0][len("cxr"):])])
    assert meta["captions"] == [row["caption"]] == [text] and meta["labels"]["finding"] == row["finding"]
    assert meta["modality"] == row["modality"] and meta["labels"]["view"] == row["view"]
    original = Image.open(row["image"]).convert("RGB")
    assert max(stored.size) == 64 and stored.format == "JPEG"
    assert abs(stored.width / stored.height - original.width / original.height) < 0.05
    reference = np.asarray(original.resize(stored.size, Image.BICUBIC), dtype=np.float32)
    assert np.abs(np.asarray(stored.convert("RGB"), dtype=np.float32) - reference).mean() < 4  # JPEG noise only
    # --part i/n: disjoint parts whose union is the whole input
    monkeypatch.setattr(builder, "PART_BLOCK", 5)
    keys = []
    for i in range(2):
        r = build_shards(read_table(src), BuildConfig(tmp_path / "parts", prefix="cxr", max_side=64, part=(i, 2)))
        for s in r.shards:
            with tarfile.open(tmp_path / "parts" / s.name) as tar:
                keys.append({n.split(".")[0] for n in tar.getnames()})
    assert not keys[0] & keys[1]
    assert len(keys[0] | keys[1]) == a.samples
    # merging the parts: one summary and a manifest that `data check` accepts and the stream reads
    assert cli_main(["shards", "merge", str(tmp_path / "parts"), "--prefix", "cxr", "--weight", "0.5"]) == 0
    merged = load_manifest(tmp_path / "parts" / "cxr.yaml")
    assert merged.samples == a.samples and merged.weight == 0.5 and len(merged.urls) == merged.shards
    assert merged.name == "cxr"
    assert check_manifest(merged) == []
    assert json.loads((tmp_path / "parts" / "cxr-summary.json").read_text())["parts"] == 2
    (tmp_path / "parts" / "cxr-summary-001.json").unlink()
    with pytest.raises(MedclipError, match=r"missing part\(s\) 1/2"):
        builder.merge_parts(tmp_path / "parts", "cxr")


def test_builder_skips_and_lists_bad_inputs(tmp_path):
    good = require_shared("medpix", "dev.jsonl")
    row = json.loads(good.read_text().splitlines()[0])
    row["image"] = str(good.parent / row["image"])
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    lines = [json.dumps(row), "{bad json", json.dumps({**row, "caption": ""}),
             json.dumps({**row, "image": "nope.jpg"}), json.dumps({**row, "image": str(tmp_path / "broken.jpg")})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    rep = build_shards(read_table(tmp_path / "in.jsonl"), BuildConfig(tmp_path / "out", max_side=64))
    assert rep.samples == 1
    assert rep.skipped == {"bad_json": 1, "missing_caption": 1, "missing_image": 1, "unreadable_image": 1}
    assert not list((tmp_path / "out").glob("*.partial"))


@pytest.mark.parametrize("fixture", ["tiny_encoder", "tiny_bert_encoder"])
def test_span_mapping_decodes_back_to_concept_text(fixture, request):
    enc = request.getfixturevalue(fixture)
    st = SpanTokenizer(enc.tokenizer)
    caption = "Chest  X-ray:\tLARGE right-sided Pleural Effusion &amp; small Pneumothorax; no cardiomegaly."
    names = ["Pleural Effusion", "Pneumothorax", "cardiomegaly", "right-sided", "X-ray"]
    spans = [CharSpan(caption.index(n), caption.index(n) + len(n)) for n in names]
    out = st(caption, spans)
    assert torch.equal(out.ids, enc.tokenizer([caption])[0])  # same ids as the model's tokenizer
    hf = getattr(enc.tokenizer, "tokenizer", None)
    for name, (s, e) in zip(names, out.spans):
        ids = out.ids[s:e].tolist()
        text = hf.decode(ids) if hf is not None else enc.tokenizer.decode(ids)
        assert "".join(text.split()).lower() == "".join(name.split()).lower(), (name, text)
        assert s >= 1  # position 0 is the start token
    # truncated away -> None, not a wrong position
    long = "word " * 100 + "pneumothorax"
    assert st(long, [CharSpan(len(long) - 12, len(long))]).spans == [None]


def test_demo_set_labels_boxes_concepts(demo_dir):
    samples = list(iter_demo_split(demo_dir, "val"))
    assert len(samples) == 60
    assert {s.labels["modality"] for s in samples} == set(MODALITIES)
    for s in samples:
        assert s.labels["finding"] in FINDINGS
        for c in s.concepts:
            assert s.captions[c["caption_index"]][c["start"]:c["end"]].lower() == c["name"]
            assert CUIS[c["name"]] == c["cui"]
        for b in s.boxes:
            x0, y0, x1, y1 = b["bbox"]
            assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 48
        if s.labels["finding"] != "normal":
            assert any(s.labels["finding"] in c.lower() for c in s.captions)
    assert check_manifest(load_manifest(demo_dir / "demo-train.yaml")) == []


def test_stream_batches_follow_the_contract(demo_dir, tiny_encoder):
    stream = build_train_stream([demo_dir / "demo-val.yaml"], tiny_encoder.tokenizer, TRANSFORM, batch_size=16)
    batches = list(stream)
    assert sum(len(b["keys"]) for b in batches) == 60
    b = batches[0]
    assert b["images"].shape == (16, 3, 32, 32) and b["text"].shape == (16, 64)
    assert b["images"].dtype == torch.uint8 and stream.image_mean == (0.0, 0.0, 0.0)
    assert b["concept_spans"].shape[:2] == b["concept_ids"].shape == b["concept_mask"].shape
    assert b["concept_spans"].dtype == b["concept_ids"].dtype == torch.long and b["concept_mask"].dtype == torch.bool
    known = {concept_key(c) for c in CUIS.values()}
    assert set(b["concept_ids"][b["concept_mask"]].tolist()) <= known
    for i in range(16):
        for j in torch.nonzero(b["concept_mask"][i]).flatten().tolist():
            s, e = b["concept_spans"][i, j].tolist()
            text = tiny_encoder.tokenizer.decode(b["text"][i, s:e].tolist()).strip()
            assert text in CUIS, text
    assert stream.skip_counts() == {}


def test_fewer_shards_than_workers(demo_dir, tiny_encoder):
    one = Manifest("one", [sorted(str(p) for p in demo_dir.glob("demo-val-*.tar"))[0]])
    stream = build_train_stream([one], tiny_encoder.tokenizer, TRANSFORM, batch_size=4, num_workers=3)
    keys = _keys(stream)
    assert len(keys) == 40 and len(set(keys)) == 40


def test_mixing_weights_are_applied_and_sources_interleaved_throughout(demo_dir, tiny_encoder):
    # Weights are visits per sample (see medclip.data.mixing): 240 x 3 = 720 train and 60 val samples.
    a = _manifest(demo_dir, "demo-train", weight=3.0, name="a")
    b = _manifest(demo_dir, "demo-val", weight=1.0, name="b")
    stream = build_train_stream([a, b], tiny_encoder.tokenizer, TRANSFORM, batch_size=50, shuffle_buffer=50)
    keys = _keys(stream)
    assert len(keys) == 780 and Counter(Counter(keys).values()) == {3: 240, 1: 60}
    # the val samples are spread over the epoch, not left for its end (draws in proportion to samples)
    halves = [keys[:390], keys[390:]]
    shares = [sum(k.startswith("demo-val") for k in h) / len(h) for h in halves]
    assert all(abs(share - 60 / 780) < 0.03 for share in shares), shares


def test_corruption_is_skipped_and_counted(tmp_path, demo_dir, tiny_encoder):
    src = sorted(demo_dir.glob("demo-val-*.tar"))[0]
    with tarfile.open(src) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    by_key: dict[str, dict] = {}
    for m, data in members:
        key, ext = m.name.split(".", 1)
        by_key.setdefault(key, {})[ext] = data
    keys = sorted(by_key)

    write = write_shard

    bad = {k: dict(by_key[k]) for k in keys[:10]}
    bad[keys[0]]["jpg"] = b"\xff\xd8\xff corrupt"
    bad[keys[1]].pop("txt")
    bad[keys[1]]["json"] = json.dumps({**json.loads(bad[keys[1]]["json"]), "captions": []}).encode()
    bad[keys[2]]["json"] = b"{not json"
    write(tmp_path / "bad.tar", bad)
    write(tmp_path / "whole.tar", {k: by_key[k] for k in keys[10:20]})
    data = (tmp_path / "whole.tar").read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        members = tar.getmembers()  # 3 per sample: jpg, json, txt
    # cut inside the image of the 6th sample, and between the 7th and 8th samples (a clean member boundary,
    # where tarfile's stream reader stops without an error)
    (tmp_path / "cut-data.tar").write_bytes(data[: members[15].offset_data + 10])
    (tmp_path / "cut-header.tar").write_bytes(data[: members[21].offset])
    bad_stream = build_train_stream([Manifest("bad", [str(tmp_path / "bad.tar")])], tiny_encoder.tokenizer,
                                    TRANSFORM, batch_size=4)
    bad_keys = _keys(bad_stream)
    assert sorted(bad_keys) == keys[3:10]
    assert bad_stream.skip_counts() == {"bad_json": 1, "corrupt_image": 1, "missing_caption": 1}
    for name, whole_samples in (("cut-data", 5), ("cut-header", 7)):
        m = Manifest("trunc", [str(tmp_path / f"{name}.tar"), str(tmp_path / "gone.tar")])
        stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=4, num_workers=2)
        got = _keys(stream)
        # every sample before the cut is read, the one cut in its image is not, the missing shard is counted
        assert sorted(got) == keys[10:10 + whole_samples], name
        assert stream.skip_counts() == {"truncated_tar": 1, "unreadable_shard": 1}, name


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_mid_epoch_resume(demo_dir, tiny_encoder, workers):
    manifests = [_manifest(demo_dir, "demo-train", 2.0), _manifest(demo_dir, "demo-val", 1.0)]

    def make():
        return build_train_stream(manifests, tiny_encoder.tokenizer, TRANSFORM, batch_size=8, seed=3,
                                  num_workers=workers, shuffle_buffer=30)

    full = _keys(make())
    first = make()
    got, state = [], None
    for i, batch in enumerate(first):
        got += batch["keys"]
        if i == 6:
            state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
            break
    resumed = make()
    resumed.load_state_dict(state)
    got += _keys(resumed)
    assert len(full) == 540 and len(set(full)) == 300  # weight 2: every train sample twice
    assert got == full  # the same order, with workers too (the resumed DataLoader starts at the worker due)
    with pytest.raises(MedclipError):
        build_train_stream(manifests, tiny_encoder.tokenizer, TRANSFORM, batch_size=8, seed=4,
                           num_workers=workers).load_state_dict(state)


def test_manifest_check_catches_missing_shard_and_wrong_count(tmp_path, demo_dir):
    text = (demo_dir / "demo-val.yaml").read_text()
    (tmp_path / "ok.yaml").write_text(text)
    assert check_manifest(load_manifest(tmp_path / "ok.yaml", root=demo_dir)) == []
    (tmp_path / "count.yaml").write_text(text.replace("samples: 60", "samples: 61"))
    problems = check_manifest(load_manifest(tmp_path / "count.yaml", root=demo_dir))
    assert any("hold 60 samples, manifest says 61" in p for p in problems)
    (tmp_path / "missing.yaml").write_text(text.replace("000001", "000002").replace("shards: 2", "shards: 3"))
    problems = check_manifest(load_manifest(tmp_path / "missing.yaml", root=demo_dir))
    assert any("missing shard" in p and "demo-val-000002.tar" in p for p in problems)
    assert cli_main(["data", "check", str(tmp_path / "missing.yaml"), "--root", str(demo_dir)]) == 1
    assert cli_main(["data", "check", str(tmp_path / "ok.yaml"), "--root", str(demo_dir)]) == 0
    assert cli_main(["data", "check", str(tmp_path / "nope.yaml")]) == 2


def test_real_data_build_and_stream_via_cli(tmp_path, tiny_bert_encoder, capsys):
    medpix = require_shared("medpix", "dev.jsonl")
    out = tmp_path / "medpix"
    assert cli_main(["shards", "build", str(medpix), "--out", str(out), "--prefix", "medpix",
                     "--max-samples", "80", "--max-side", "96", "--processes", "2"]) == 0
    summary = json.loads((out / "medpix-summary.json").read_text())
    assert summary["samples"] == 197 and len(summary["shards"]) == 3
    m = Manifest("medpix", sorted(str(p) for p in out.glob("medpix-*.tar")), caption_fields=["captions"])
    stream = build_train_stream([m], tiny_bert_encoder.tokenizer, TRANSFORM, batch_size=32, num_workers=2)
    batches = list(stream)
    assert sum(len(b["keys"]) for b in batches) == 197
    assert batches[0]["text"][:, 0].eq(tiny_bert_encoder.tokenizer.tokenizer.cls_token_id).all()
    assert batches[0]["concept_mask"].shape[1] == 1 and not batches[0]["concept_mask"].any()


def test_shipped_manifests_load():
    paths = sorted((Path(__file__).resolve().parent.parent / "datasets_manifests").glob("*.yaml"))
    names = {load_manifest(p, root="/data").name for p in paths}
    assert len([n for n in names if n.startswith("unimed-")]) == 13
    assert {"medconcept-23m", "demo-train"} <= names


def test_medconcept_spans_become_concepts(tmp_path, tiny_bert_encoder):
    row = json.loads(require_shared("medpix", "dev.jsonl").read_text().splitlines()[0])
    image = str(require_shared("medpix") / row["image"])
    caption = "Axial CT shows a left pleural effusion and a pulmonary nodule."
    spans = [(caption.index(t), caption.index(t) + len(t), cui) for t, cui in
             (("pleural effusion", "C0032227"), ("nodule", "C0028259"))]
    rec = {"pmid": 1, "caption": caption, "image": image,
           "umls_meta_info": [{"umls_cui": c, "start_char": s, "end_char": e, "umls_similarity": 1.0}
                              for s, e, c in spans]}
    (tmp_path / "mc.jsonl").write_text(json.dumps(rec) + "\n")
    rep = build_shards(builder.read_medconcept(tmp_path / "mc.jsonl"), BuildConfig(tmp_path / "out", max_side=64))
    assert rep.samples == 1 and not rep.skipped
    m = Manifest("mc", [str(tmp_path / "out" / rep.shards[0].name)], caption_fields=["captions"])
    batch = next(iter(build_train_stream([m], tiny_bert_encoder.tokenizer, TRANSFORM, batch_size=1)))
    assert batch["concept_mask"].tolist() == [[True, True]]
    hf = tiny_bert_encoder.tokenizer.tokenizer
    decoded = [hf.decode(batch["text"][0, s:e].tolist()) for s, e in batch["concept_spans"][0].tolist()]
    assert decoded == ["pleural effusion", "nodule"]
    assert batch["concept_ids"][0].tolist() == [concept_key("C0032227"), concept_key("C0028259")]


def _images_by_key(batches) -> dict[str, torch.Tensor]:
    return {k: img.clone() for b in batches for k, img in zip(b["keys"], b["images"])}


def test_uint8_images_normalise_to_the_full_transform_exactly(demo_dir, tiny_encoder):
    def stream(uint8: bool):
        return build_train_stream([demo_dir / "demo-val.yaml"], tiny_encoder.tokenizer, AUGMENT, batch_size=16,
                                  seed=1, uint8_images=uint8)

    packed = stream(True)
    small = list(packed)
    full = list(stream(False))
    assert small[0]["images"].dtype == torch.uint8 and full[0]["images"].dtype == torch.float32
    assert packed.image_mean == tuple(AUGMENT.transforms[-1].mean) and packed.image_std is not None
    for a, b in zip(small, full):
        assert a["keys"] == b["keys"]
        assert torch.equal(normalize_images(a["images"], packed.image_mean, packed.image_std), b["images"])
    with pytest.raises(MedclipError):
        normalize_images(full[0]["images"], packed.image_mean, packed.image_std)


def test_normalize_images_of_a_large_batch_matches_to_tensor_and_normalize():
    # 8 x 3 x 224 x 224 float32 = 4.8 MB: the output takes the huge-page allocation where available
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    images = torch.randint(0, 256, (8, 3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize_images(images, mean, std)
    norm = transforms.Normalize(mean, std)
    expected = torch.stack([norm(transforms.ToTensor()(img.permute(1, 2, 0).numpy())) for img in images])
    assert out.is_contiguous() and out.dtype == torch.float32 and torch.equal(out, expected)
    assert torch.equal(normalize_images(images.contiguous(memory_format=torch.channels_last), mean, std), expected)
    del out  # the mapping is released with the tensor


def _gray_test_images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (45, 70), dtype=np.uint8)
    smooth = np.add.outer(np.arange(90), np.arange(60)).astype(np.uint8)  # larger than the output
    return [Image.fromarray(gray).convert("RGB"), Image.fromarray(gray), Image.fromarray(smooth).convert("RGB")]


Interp = transforms.InterpolationMode


@pytest.mark.parametrize("transform", [
    image_transform_v2(PreprocessCfg(size=32), is_train=True),  # open_clip: RandomResizedCrop bicubic + RGB
    image_transform_v2(PreprocessCfg(size=32), is_train=False),  # Resize + CenterCrop
    transforms.Compose([transforms.Resize(40, Interp.BILINEAR), transforms.CenterCrop(48), transforms.RandomHorizontalFlip(),
                        transforms.ToTensor()]),  # CenterCrop larger than the image pads
    transforms.Compose([transforms.RandomResizedCrop(24, interpolation=Interp.NEAREST), transforms.RandomVerticalFlip(),
                        transforms.ToTensor()]),
    transforms.Compose([transforms.RandomResizedCrop(28, interpolation=Interp.LANCZOS), transforms.ToTensor()]),
])
def test_gray_shortcut_gives_the_rgb_pixels_exactly(transform):
    pil = split_transform(transform).pil_transform
    gray = gray_transform(pil)
    assert gray is not None
    for image in _gray_test_images():
        plane = gray_plane(image)
        assert plane is not None and plane.mode == "L"
        for seed in range(6):
            with seeded_augmentation(seed):
                rgb = to_uint8_planes(pil(image.convert("RGB")))
            with seeded_augmentation(seed):
                one = to_uint8_planes(gray(plane))
            assert one.shape[0] == 1 and rgb.shape[0] == 3
            assert np.array_equal(np.broadcast_to(one, rgb.shape), rgb)


def test_gray_shortcut_only_for_gray_images_and_channelwise_steps():
    assert gray_transform(split_transform(transforms.Compose(
        [transforms.RandomResizedCrop(32), transforms.ColorJitter(0.4, 0.4, 0.4), transforms.ToTensor()])).pil_transform) is None
    assert gray_transform(transforms.Compose([transforms.Lambda(lambda im: im)])) is None
    assert gray_transform(lambda im: im) is None
    pixels = np.asarray(_gray_test_images()[0]).copy()
    pixels[3, 5, 1] ^= 1  # one colour pixel away from the middle row checked first
    assert gray_plane(Image.fromarray(pixels)) is None
    assert gray_plane(Image.fromarray(pixels).convert("RGBA")) is None


def test_gray_shortcut_leaves_real_batches_unchanged(tmp_path, tiny_encoder):
    # Real MedPix (CT/MRI stored as RGB) and COVID-CXR (some grayscale JPEGs, some colour figures) images.
    rows = tmp_path / "rows"
    rows.mkdir()
    urls = []
    for name, table in (("medpix", ("medpix", "train.jsonl")), ("cxr", ("covid-cxr", "train.jsonl"))):
        sub = _subset_jsonl(require_shared(*table), rows / f"{name}.jsonl", 120)
        rep = build_shards(read_table(sub), BuildConfig(tmp_path / "shards", prefix=name, max_samples=50))
        urls += [str(tmp_path / "shards" / s.name) for s in rep.shards]
    members = []
    for u in urls:
        with tarfile.open(u) as tar:
            members += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    gray = sum(gray_plane(Image.open(io.BytesIO(b))) is not None for b in members)
    assert 0 < gray < len(members)  # both paths are exercised
    transform = image_transform_v2(PreprocessCfg(size=64), is_train=True)

    def batches(shortcut: bool):
        return list(build_train_stream([Manifest("real", urls, caption_fields=["captions"])], tiny_encoder.tokenizer,
                                       transform, batch_size=32, seed=5, num_workers=2, gray_shortcut=shortcut))

    fast, plain = batches(True), batches(False)
    assert sum(len(b["keys"]) for b in fast) > 150
    assert [b["keys"] for b in fast] == [b["keys"] for b in plain]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(fast, plain))


def test_workers_hand_their_bpe_words_to_the_next_epoch(demo_dir, tiny_encoder):
    def make():
        return build_train_stream([demo_dir / "demo-val.yaml"], tiny_encoder.tokenizer, AUGMENT, batch_size=8,
                                  seed=2, num_workers=2)

    warm = make()
    assert not warm.decoder.tokenizer._word_cache
    list(warm)  # epoch 0: BPE runs in the workers, their new words come back with their last message
    assert len(warm.decoder.tokenizer._word_cache) > 20
    cold = make()
    cold.set_epoch(1)
    for a, b in zip(warm, cold, strict=True):  # epoch 1 from a warm and from a cold cache: same batches
        assert a["keys"] == b["keys"] and torch.equal(a["text"], b["text"]) and torch.equal(a["images"], b["images"])


def test_augmentation_is_replayed_exactly_after_resume(demo_dir, tiny_encoder):
    manifests = [_manifest(demo_dir, "demo-train", 1.0), _manifest(demo_dir, "demo-val", 1.0)]

    def make(seed=3):
        return build_train_stream(manifests, tiny_encoder.tokenizer, AUGMENT, batch_size=8, seed=seed,
                                  num_workers=2, shuffle_buffer=30)

    torch.manual_seed(11)  # the DataLoader seeds its workers from the global RNG: vary it between passes
    full = _images_by_key(make())
    torch.manual_seed(12)
    again = _images_by_key(make())
    assert len(full) == 300 and full.keys() == again.keys()
    assert all(torch.equal(full[k], again[k]) for k in full)

    first = make()
    for i, _ in enumerate(first):
        if i == 6:
            state = json.loads(json.dumps(first.state_dict()))
            break
    torch.manual_seed(13)
    resumed = make()
    resumed.load_state_dict(state)
    rest = _images_by_key(resumed)
    assert 0 < len(rest) < 300 - 7 * 8 + 1
    assert all(torch.equal(rest[k], full[k]) for k in rest)

    # the crops really are random: another seed gives other pixels for the same samples
    other = _images_by_key(make(seed=4))
    assert sum(not torch.equal(other[k], full[k]) for k in full) > 250


def test_first_caption_share_sets_how_often_the_own_caption_is_drawn():
    from medclip.data.stream import draw_caption, seeded_rng

    draws = 6000
    for share, expected in [(None, [1 / 3] * 3), (0.6, [0.6, 0.2, 0.2]), (1.0, [1.0, 0.0, 0.0]), (0.0, [0, .5, .5])]:
        counts = Counter(draw_caption(seeded_rng(0, 0, "key", i), 3, share) for i in range(draws))
        for index, want in enumerate(expected):
            assert abs(counts[index] / draws - want) < 0.025, (share, counts)
        assert draw_caption(seeded_rng(1), 1, share) == 0
    with pytest.raises(MedclipError, match="first_caption_share"):
        StreamConfig(batch_size=4, first_caption_share=-0.1)
