"""Recipe data.build: a real table becomes annotated shards with label captions and a manifest."""

from __future__ import annotations

import json
import logging
import tarfile
from dataclasses import replace

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

    metas = _shard_metas(manifest_path)  # in row order (the shards hold them permuted)
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


def _shard_metas(manifest_path):
    """The samples' metadata in input row order (a sample's key ends in its row index)."""
    manifest = load_manifest(manifest_path)
    metas = {}
    for url in manifest.urls:
        with tarfile.open(url) as tar:
            metas.update({m.name: json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                          if m.name.endswith(".json")})
    return [metas[k] for k in sorted(metas)]


def _shard_image_sizes(manifest_path):
    from PIL import Image

    sizes = []
    for url in load_manifest(manifest_path).urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                if m.name.endswith((".jpg", ".png")):
                    with Image.open(tar.extractfile(m)) as img:
                        sizes.append(max(img.size))
    return sizes


def test_build_source_rebuilds_when_its_spec_or_input_changes(tmp_path, caplog):
    medpix = require_shared("medpix")
    rows = [json.loads(line) for line in (medpix / "dev.jsonl").read_text().splitlines()[:6]]
    table = tmp_path / "rows.jsonl"

    def write_rows(rows):
        table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n" for r in rows))

    write_rows(rows)
    vocab = tmp_path / "vocab.tsv"
    vocab.write_text("C0000001\tprostate\n")
    spec = BuildSpec(name="mini", input=str(table), vocab=[str(vocab)], max_side=64)
    out = tmp_path / "shards"
    manifest_path = build_source(spec, out)
    assert max(_shard_image_sizes(manifest_path)) == 64
    stamp = manifest_path.stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="medclip.training.prepare")
    # Only the sampling weight changed: the shards stay, the manifest says the new weight.
    assert build_source(replace(spec, weight=0.25), out) == manifest_path
    assert load_manifest(manifest_path).weight == 0.25 and not any("rebuilding" in r.message for r in caplog.records)

    # Another max side: rebuilt, and the log says why.
    build_source(replace(spec, max_side=32), out)
    assert max(_shard_image_sizes(manifest_path)) == 32 and manifest_path.stat().st_mtime_ns != stamp
    assert any("rebuilding" in r.message and "max_side 64 -> 32" in r.message for r in caplog.records)

    # Other label captions: rebuilt with them.
    labelled = replace(spec, max_side=32, label_captions=["{modality} image."])
    assert all(f"{r['modality']} image." in m["captions"] for m, r in zip(_shard_metas(build_source(labelled, out)), rows))

    # The same path with other rows (an edited table): rebuilt from the new rows, old shards gone.
    caplog.clear()
    write_rows(rows[:3])
    metas = _shard_metas(build_source(labelled, out))
    assert len(metas) == 3 and load_manifest(manifest_path).samples == 3
    assert any("input file(s) changed" in r.message and str(table.resolve()) in r.message for r in caplog.records)
    assert all(str(p) in load_manifest(manifest_path).urls for p in (out / "mini").resolve().glob("*.tar"))

    # An edited vocabulary file: rebuilt with the new concept.
    before = sum(len(m["concepts"]) for m in metas)
    vocab.write_text("C0000001\tprostate\nC0000002\tbladder\n")
    metas = _shard_metas(build_source(labelled, out))
    assert sum(len(m["concepts"]) for m in metas) > before
    assert any(c["cui"] == "C0000002" for m in metas for c in m["concepts"])

    # Another seed of the sample order: rebuilt (the key holds the order settings).
    caplog.clear()
    build_source(replace(labelled, seed=1), out)
    assert any("rebuilding" in r.message and "shuffle_seed 0 -> 1" in r.message for r in caplog.records)
    labelled = replace(labelled, seed=1)

    # Unchanged: reused as before.
    stamp = manifest_path.stat().st_mtime_ns
    assert build_source(labelled, out) == manifest_path and manifest_path.stat().st_mtime_ns == stamp


def test_label_names_rename_values_and_leave_placeholders_out(tmp_path, caplog):
    """Label captions name a finding as the evaluation does; a placeholder value (`todo`) writes no label caption."""
    covid = require_shared("covid-cxr")
    rows = [json.loads(line) for line in (covid / "train.jsonl").read_text().splitlines()]
    picked = [next(r for r in rows if r["finding"] == f and r["view"]) for f in ("COVID-19", "ARDS", "todo", "SARS")]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(covid / r["image"])}) + "\n" for r in picked))
    spec = BuildSpec(name="covid-mini", input=str(table), label_captions=["{view} chest X-ray showing {finding}."],
                     label_names={"finding": {"COVID-19": "COVID-19 pneumonia", "ARDS": "acute respiratory distress "
                                              "syndrome", "todo": None, "Legionellla": "legionella pneumonia"}},
                     max_side=32)
    caplog.set_level(logging.INFO, logger="medclip.training.prepare")
    metas = _shard_metas(build_source(spec, tmp_path / "shards"))
    label_captions = [[c for c in m["captions"] if "chest X-ray showing" in c] for m in metas]
    view = [r["view"] for r in picked]
    assert label_captions == [[f"{view[0]} chest X-ray showing COVID-19 pneumonia."],
                              [f"{view[1]} chest X-ray showing acute respiratory distress syndrome."],
                              [],  # todo: named null, so only its own caption
                              [f"{view[3]} chest X-ray showing SARS."]]  # not listed: written as it is
    assert metas[2]["captions"] == [picked[2]["caption"].strip()]
    assert any("finding='todo' x1" in r.message for r in caplog.records)
    assert any("label_names values no row of" in r.message and "finding='Legionellla'" in r.message
               for r in caplog.records)  # a misspelt value renames nothing: the log says so


def test_label_names_of_a_field_no_template_writes_stop_the_recipe():
    import pytest

    from medclip.errors import MedclipError
    from medclip.training.config import load_recipe

    with pytest.raises(MedclipError, match=r"label_names\.findng names values of a field no label_captions template "
                                           r"writes \(fields the templates use: finding, view\)"):
        load_recipe("finetune_full", ["data.build=[{name: c, input: x.jsonl, label_captions: ['{view} showing "
                                      "{finding}.'], label_names: {findng: {todo: null}}}]"])
    with pytest.raises(MedclipError, match=r"recipe key data\.build\[0\]\.label_names: expected a mapping, got \['todo'\]"):
        load_recipe("finetune_full", ["data.build=[{name: c, input: x.jsonl, label_names: [todo]}]"])


def test_label_names_keys_yaml_reads_as_other_types_and_bad_templates_stop_in_one_line():
    import pytest

    from medclip.errors import MedclipError
    from medclip.training.config import load_recipe

    build = "data.build=[{name: c, input: x.jsonl, label_captions: ['%s'], label_names: %s}]"
    with pytest.raises(MedclipError, match=r"label_names\.effusion: key True is not text .*quote it"):
        load_recipe("finetune_full", [build % ("{effusion}", "{effusion: {yes: pleural effusion, no: null}}")])
    recipe = load_recipe("finetune_full", [build % ("{effusion}", "{effusion: {'yes': pleural effusion, 'no': null}}")])
    assert recipe.data.build[0].label_names == {"effusion": {"yes": "pleural effusion", "no": None}}
    with pytest.raises(MedclipError, match=r"label_captions: template '\{view chest' is not a format string"):
        load_recipe("finetune_full", [build % ("{view chest", "{}")])
    # {finding[0]} reads the field finding: its names are used, not refused
    assert load_recipe("finetune_full", [build % ("{finding[0]}", "{finding: {todo: null}}")])


def test_fine_tuning_recipes_name_findings_as_the_covid_suite_does():
    """Training captions and zero-shot prompts must say the same words: the recipes' label_names agree with the
    suite's class names (and with each other)."""
    from medclip.evaluation.suites import load_suite
    from medclip.training.config import load_recipe

    (finding,) = [d for d in load_suite("covid").datasets if d.name == "covid_finding"]
    names = [load_recipe(f"finetune_{mode}").data.build[0].label_names for mode in ("full", "lit", "lora")]
    assert names[0] == names[1] == names[2]
    assert len(finding.classes.labels) == 7
    for label, name in zip(finding.classes.labels, finding.classes.names):
        assert names[0]["finding"].get(label, label) == name  # a value not listed is written as it is
    assert names[0]["finding"]["todo"] is None
