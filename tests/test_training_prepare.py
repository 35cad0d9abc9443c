"""Recipe data.build: a real table becomes annotated shards with label captions and a manifest."""

from __future__ import annotations

import json
import tarfile

from conftest import require_shared

from medclip.data.manifest import check_manifest, load_manifest
from medclip.training.prepare import BuildSpec, build_source


def test_build_source_from_real_medpix_rows(tmp_path):
    medpix = require_shared("medpix")
    vocab = require_shared("vocab")
    rows = [json.loads(line) for line in (medpix / "dev.jsonl").read_text().splitlines()[:12]]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n" for r in rows))
    spec = BuildSpec(name="medpix-mini", input=str(table), label_captions=["{modality} image of the {location_category}.",
                                                                           "{no_such_field} is skipped"],
                     vocab=[str(vocab / "mesh_anatomy_disease.tsv"), str(vocab / "chexpert_phrases")], max_side=64)
    manifest_path = build_source(spec, tmp_path / "shards")
    manifest = load_manifest(manifest_path)
    assert manifest.samples == 12 and check_manifest(manifest) == []

    with tarfile.open(manifest.urls[0]) as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(metas) == 12
    for meta, row in zip(metas, rows):
        assert meta["captions"][0] == row["caption"].strip()
        assert f"{row['modality']} image of the {row['location_category']}." in meta["captions"]
        assert not any("no_such_field" in c for c in meta["captions"])
        for concept in meta["concepts"]:  # every span points at the concept's words in its caption
            text = meta["captions"][concept["caption_index"]][concept["start"]:concept["end"]]
            assert text and concept["cui"]
    assert sum(len(m["concepts"]) for m in metas) > 0

    # A second call reuses the finished shards (resume, or a second recipe run).
    stamp = manifest_path.stat().st_mtime_ns
    assert build_source(spec, tmp_path / "shards") == manifest_path and manifest_path.stat().st_mtime_ns == stamp
