"""The engine parity bench: its parity row gives medclip the input and settings open_clip_train gets, each
ablation row adds one of medclip's own choices, and the open_clip_train side trains medclip's models."""

import json
import subprocess
from pathlib import Path

import pytest
from conftest import require_shared
from engine_helpers import load_bench

from medclip.data.manifest import load_manifest
from medclip.training.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "pretrain" / "shared_real.yaml"


def _bench():
    return load_bench("engine_parity.py")


def _mini_pool(tmp_path, bench, images=8, passes=2):
    """Shards of ``images`` real MedPix rows with label captions, and their caption-pool passes."""
    from medclip.training.prepare import BuildSpec, build_source

    medpix = require_shared("medpix")
    rows = [json.loads(line) for line in (medpix / "dev.jsonl").read_text().splitlines()[:images]]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n" for r in rows))
    spec = BuildSpec(name="mini", input=str(table), max_side=48, label_captions=["{modality} image."])
    urls = bench.ocb.shard_urls([build_source(spec, tmp_path / "shards")])
    paths, per_pass = bench.ocb.write_caption_pool(urls, tmp_path / "pool", passes=passes)
    return urls, paths, per_pass


def test_parity_row_reads_the_pool_shards_with_open_clip_trains_settings(tmp_path):
    bench = _bench()
    recipe = load_recipe(RECIPE)
    urls, paths, per_pass = _mini_pool(tmp_path, bench)
    manifest = bench.pool_manifest(paths, 2 * per_pass, tmp_path / "pool.yaml")
    loaded = load_manifest(manifest)
    assert loaded.urls == paths and loaded.samples == 16 and loaded.caption_fields == ["txt"]

    def run_recipe(row):
        return load_recipe(RECIPE, bench.medclip_overrides(bench.ROWS[row], recipe, 240, manifest))

    parity = run_recipe("parity")
    assert parity.data.build == [] and [s.manifest for s in parity.data.sources] == [str(manifest)]
    assert parity.data.shuffle_buffer == bench.OPEN_CLIP_SAMPLE_SHUFFLE and parity.objective.pc_weight == 0
    # the rest is the recipe's: batch, optimiser, schedule, model
    assert (parity.data.batch_size, parity.optim, parity.model) == (recipe.data.batch_size, recipe.optim, recipe.model)

    own = run_recipe("own-shards")
    assert own.data.build == recipe.data.build and own.data.sources == []
    assert own.data.shuffle_buffer == bench.OPEN_CLIP_SAMPLE_SHUFFLE
    assert run_recipe("buffer-500").data.shuffle_buffer == recipe.data.shuffle_buffer
    shipped = run_recipe("shipped")  # the recipe itself, its PC-Align stage starting at the same fraction
    assert shipped.objective.pc_weight == recipe.objective.pc_weight > 0
    assert shipped.objective.pc_start_step == round(recipe.objective.pc_start_step * 240 / recipe.run.steps)
    assert shipped.data == recipe.data


def test_parity_buffer_is_open_clip_trains():
    from open_clip_train import data

    assert _bench().OPEN_CLIP_SAMPLE_SHUFFLE == data._SAMPLE_SHUFFLE_SIZE


def test_table_marks_differences_within_the_spread():
    bench = _bench()
    results = {"open_clip_train": {0: {"a": 0.50, "b": 0.20}, 1: {"a": 0.60, "b": 0.22}},
               "parity": {0: {"a": 0.52, "b": 0.30}, 1: {"a": 0.62, "b": 0.32}}}
    results["shipped"] = {0: {"a": 0.64, "b": 0.30}, 1: {"a": 0.64, "b": 0.30}}
    lines = bench.table(results)
    assert lines[0] == "| dataset | open_clip_train (seeds 2) | parity (seeds 2) | shipped (seeds 2) |"
    # 2 points inside a 7.1-point spread, 9 outside it; 10 points outside 1.4
    assert lines[2] == "| a | 55.0 ± 7.1 | 57.0 ± 7.1 (+2.0 =) | 64.0 ± 0.0 (+9.0) |"
    assert lines[3] == "| b | 21.0 ± 1.4 | 31.0 ± 1.4 (+10.0) | 30.0 ± 0.0 (+9.0) |"
    stepwise = bench.table(results, None)  # each row against the one before it
    assert stepwise[2] == "| a | 55.0 ± 7.1 | 57.0 ± 7.1 (+2.0 =) | 64.0 ± 0.0 (+7.0 =) |"
    assert stepwise[3] == "| b | 21.0 ± 1.4 | 31.0 ± 1.4 (+10.0) | 30.0 ± 0.0 (-1.0 =) |"
    results["long-captions"] = {0: {"a": 0.40, "b": 0.40}, 1: {"a": 0.40, "b": 0.40}}
    results["pool-positives"] = {0: {"a": 0.70, "b": 0.40}, 1: {"a": 0.70, "b": 0.40}}  # candidates: against shipped
    assert bench.table(results, None)[2].endswith("| 40.0 ± 0.0 (-24.0) | 70.0 ± 0.0 (+6.0) |")
    assert bench.table({"parity": {}}) == ["(no row has a finished, evaluated seed yet)"]  # --report before any run
    seed = {name: 0.5 for name in bench.DEV} | {"covid_view": 0.9, "medpix_modality": 0.8}
    assert bench.with_dev_mean(seed)["medpix_dev_mean"] == pytest.approx((0.8 + 5 * 0.5) / 6)  # COVID-19 not in it


@pytest.mark.integration
def test_open_clip_train_side_trains_a_medclip_model(tmp_path):
    """The baseline subprocess registers medclip's configs with open_clip (medclip's import is lazy) and its
    checkpoint exports through medclip.load."""
    bench = _bench()
    _, paths, _ = _mini_pool(tmp_path, bench)
    logs = tmp_path / "logs"
    logs.mkdir()
    recipe = load_recipe(RECIPE, ["data.batch_size=4", "optim.warmup_steps=1"])
    argv = bench.ocb.baseline_argv(recipe, "medclip-tiny", paths, 2, logs, "baseline")
    proc = subprocess.run(bench.ocb.SELF + argv, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    checkpoint = logs / "baseline" / "checkpoints" / "epoch_1.pt"
    export = bench.ocb.export_baseline("medclip-tiny", checkpoint, tmp_path / "export")
    assert (Path(export) / "open_clip_config.json").exists()
