"""Sample order: batch composition does not depend on how the input table was sorted (issue 30, item 0).

Real rows go through `medclip shards build` and the training stream at the shared_real recipe's settings
(MedPix + COVID-CXR train, batch 32, shuffle buffer 500, 1 loader worker): MedPix sorted by modality
(878 CT then 775 MRI) against the same rows in a random order.
"""

from __future__ import annotations

import json
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from conftest import require_shared
from open_clip.transform import PreprocessCfg, image_transform_v2

from medclip.cli import main as cli_main
from medclip.data.manifest import Manifest, write_manifest
from medclip.data.stream import build_train_stream

BATCH = 32


def _rows(table: Path) -> list[dict]:
    return [json.loads(line) for line in table.read_text().splitlines() if line.strip()]


def _write(rows: list[dict], folder: Path, path: Path) -> Path:
    path.write_text("".join(json.dumps({**r, "image": str(folder / r["image"])}) + "\n" for r in rows))
    return path


def _tables(tmp_path: Path) -> tuple[Path, Path, list[dict]]:
    """The MedPix train table sorted by modality, and the same rows in a random order."""
    medpix = require_shared("medpix")
    rows = _rows(medpix / "train.jsonl")
    shuffled = list(rows)
    random.Random(7).shuffle(shuffled)
    return (_write(sorted(rows, key=lambda r: r["modality"]), medpix, tmp_path / "sorted.jsonl"),
            _write(shuffled, medpix, tmp_path / "shuffled.jsonl"), rows)


def _build(table: Path, out: Path, *flags: str, prefix: str = "mp") -> list[str]:
    assert cli_main(["shards", "build", str(table), "--out", str(out), "--prefix", prefix, "--max-side", "32",
                     "--processes", "2", *flags]) == 0
    return sorted(str(p) for p in out.glob(f"{prefix}-*.tar"))


def _batch_statistics(sources: dict[str, tuple[list[str], Path]], tokenizer) -> dict[str, float]:
    """Per-batch modality statistics over one epoch of the real training stream (``sources``: prefix ->
    (shard URLs, the table they were built from; a key is the prefix and the row index))."""
    modality = {prefix: [r["modality"] for r in _rows(table)] for prefix, (_, table) in sources.items()}
    manifests = [Manifest(prefix, urls, caption_fields=["captions"]) for prefix, (urls, _) in sources.items()]
    stream = build_train_stream(manifests, tokenizer, image_transform_v2(PreprocessCfg(size=32), is_train=True),
                                batch_size=BATCH, seed=0, num_workers=1, shuffle_buffer=500, drop_last=True)
    no_mri, pairs, n = 0, 0.0, 0
    for batch in stream:
        labels = Counter(modality[k[:2]][int(k[2:])] for k in batch["keys"])
        no_mri += labels["MRI"] == 0
        size = sum(labels.values())
        pairs += sum(c * (c - 1) for c in labels.values()) / (size * (size - 1))  # share of same-label pairs
        n += 1
    return {"batches": n, "no_mri": no_mri / n, "same_label_pairs": pairs / n}


@pytest.mark.integration
def test_a_label_sorted_table_gives_the_batches_of_a_shuffled_one(tmp_path, tiny_encoder):
    sorted_table, shuffled_table, rows = _tables(tmp_path)
    covid = require_shared("covid-cxr")
    xray = _write(_rows(covid / "train.jsonl"), covid, tmp_path / "covid.jsonl")
    cx = (_build(xray, tmp_path / "cx", prefix="cx"), xray)
    stats = {name: _batch_statistics({"mp": (_build(table, tmp_path / name), table), "cx": cx},
                                     tiny_encoder.tokenizer)
             for name, table in (("sorted", sorted_table), ("shuffled", shuffled_table))}
    everything = Counter(r["modality"] for r in rows) + Counter(r["modality"] for r in _rows(xray))
    total = sum(everything.values())
    chance = sum((c / total) ** 2 for c in everything.values())  # same-label pair share of a random batch: 0.35
    samples = len(rows) + sum(len(_keys(u)) for u in cx[0])
    assert all(s["batches"] == samples // BATCH for s in stats.values()), stats  # a whole epoch
    # A random batch of 32 lacks MRI (35 % of the samples) with chance 0.65^32 ~ 1e-6, and its same-label pair
    # share has a spread of ~0.04 around `chance`: ~0.005 over the epoch's ~69 batches. 0.03 is six times that;
    # the table-order build of the sorted table gives ~40 % of batches without MRI and a share ~0.1 too high.
    for s in stats.values():
        assert s["no_mri"] == 0.0, stats
        assert abs(s["same_label_pairs"] - chance) < 0.03, stats
    assert abs(stats["sorted"]["same_label_pairs"] - stats["shuffled"]["same_label_pairs"]) < 0.03, stats


@pytest.mark.integration
def test_data_check_warns_about_shards_in_label_blocks(tmp_path, capsys):
    sorted_table, _, rows = _tables(tmp_path)
    for name, flags in (("in_order", ["--no-shuffle"]), ("shuffled", [])):
        urls = _build(sorted_table, tmp_path / name, *flags)
        manifest = write_manifest(tmp_path / name / "mp.yaml", name=name, urls=urls, samples=len(rows),
                                  shards=len(urls))
        capsys.readouterr()
        assert cli_main(["data", "check", str(manifest)]) == 0  # a warning, not a failure
        out = capsys.readouterr().out
        warned = [line for line in out.splitlines() if line.startswith("WARN ")]
        if name == "in_order":  # one shard of 878 CT then 775 MRI: 2 modality blocks where chance gives ~827
            assert len(urls) == 1 and len(warned) == 1, out
            assert re.search(r"shard mp-000000.tar: 1653 samples in 2 same-modality blocks where a random "
                             r"order has ~8\d\d", warned[0]), out
        else:  # the default build: several shards, none in blocks
            assert len(urls) == 8 and warned == [], out
        assert f"OK   {name}:" in out


def test_shuffled_parts_are_disjoint_and_cover_the_input(tmp_path):
    sorted_table, _, rows = _tables(tmp_path)
    small = tmp_path / "small.jsonl"
    small.write_text("".join(sorted_table.read_text().splitlines(keepends=True)[:300]))
    keys = []
    for i in range(3):
        urls = _build(small, tmp_path / "parts", "--part", f"{i}/3")
        keys.append({m for u in urls if f"-{i:03d}-" in u for m in _keys(u)})
    assert sum(len(k) for k in keys) == 300 and len(set().union(*keys)) == 300
    whole = {m for u in _build(small, tmp_path / "whole") for m in _keys(u)}
    assert whole == set().union(*keys)


def _keys(url: str) -> set[str]:
    with tarfile.open(url) as tar:
        return {n.split(".")[0] for n in tar.getnames()}


@pytest.mark.parametrize("order", ["sorted", "interleaved"])
def test_order_check_counts_runs(tmp_path, order):
    """The runs test on its own: a two-block shard is reported, an alternating one is not."""
    from medclip.data.order_check import blocked_fields

    labels = [{"modality": "CT" if (i < 50 if order == "sorted" else i % 2) else "MRI"} for i in range(100)]
    found = blocked_fields(labels)
    assert found == ([("modality", 2, pytest.approx(100 - (50 * 49 * 2) / 100))] if order == "sorted" else [])
