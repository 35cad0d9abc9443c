"""The shared_real comparison: open_clip_train gets the recipe's optimiser and batch settings and, for data
parity, the same caption pool; medclip is held to the same budget."""

import json
import math
import tarfile
from pathlib import Path

import pytest
from conftest import require_shared
from engine_helpers import load_bench
from open_clip_train.params import parse_args

from medclip.training.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    return load_bench("shared_real_vs_open_clip.py")


def _baseline():
    return load_bench("_open_clip_baseline.py")


def test_baseline_runs_the_recipes_optimiser(tmp_path):
    bench = _bench()
    recipe = load_recipe(ROOT / "pretrain" / "shared_real.yaml",
                         ["optim.beta1=0.8", "optim.beta2=0.95", "optim.eps=1e-7", "optim.lr=2e-3"])
    # "vit" in the name would make open_clip_train choose 0.9 / 0.98 / 1e-6 on its own
    model, settings = bench.baseline_settings(recipe, "ViT-B-32@64")
    args = parse_args(_baseline().baseline_argv(settings, model, ["a.tar"], 300, tmp_path, "baseline"))
    assert (args.beta1, args.beta2, args.eps, args.lr) == (0.8, 0.95, 1e-7, 2e-3)
    assert args.wd == recipe.optim.weight_decay
    assert args.batch_size == 64 and args.train_num_samples == 300 * 64
    # the warmup keeps its length in samples at the other batch size
    assert args.warmup * 64 == recipe.optim.warmup_steps * recipe.data.batch_size


def test_baseline_batch_spec():
    bench = _bench()
    recipe = load_recipe(ROOT / "pretrain" / "shared_real.yaml")
    assert bench.baseline_settings(recipe, "medclip-small") == ("medclip-small", recipe)
    with pytest.raises(SystemExit, match="must be an integer"):
        bench.baseline_settings(recipe, "medclip-small@big")


def test_medclip_is_held_to_the_budget(tmp_path):
    """medclip's side runs with run.budget_seconds on the process's clock (no calibration run), or a step count."""
    bench = _bench()
    args = bench.argparse.Namespace(recipe="pretrain/shared_real.yaml", overrides=["optim.lr=2e-3"], budget=600.0)

    def recipe_of(cmd):
        overrides = [cmd[i + 1] for i, part in enumerate(cmd) if part == "--set"]
        return load_recipe(ROOT / "pretrain" / "shared_real.yaml", overrides)

    recipe = recipe_of(bench.medclip_command(args, tmp_path / "run", seed=3, steps=None, extra=["run.log_every=5"]))
    assert recipe.run.budget_seconds == 600.0 and recipe.run.budget_from == "process"
    assert recipe.eval.suites == [] and recipe.run.seed == 3
    assert recipe.optim.lr == 2e-3 and recipe.run.log_every == 5 and recipe.run.output_dir == str(tmp_path / "run")
    recipe = recipe_of(bench.medclip_command(args, tmp_path / "run", seed=3, steps=123))
    assert recipe.run.steps == 123 and recipe.run.budget_seconds is None
    # what the run reports: its steps and the budget it used
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0},
                                                          {"step": 2, "budget_s": 600.0, "budget_used_s": 590.5}]))
    assert bench.budget_used(log) == (2, 590.5)


def test_caption_pool_shards_draw_one_caption_per_image_and_pass(tmp_path):
    from medclip.training.prepare import BuildSpec, build_source

    medpix = require_shared("medpix")
    rows = [json.loads(line) for line in (medpix / "dev.jsonl").read_text().splitlines()[:8]]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n" for r in rows))
    spec = BuildSpec(name="mini", input=str(table), max_side=32,
                     label_captions=["{modality} image of the {location_category}.", "{plane} {modality} image."])
    bench = _bench()
    urls = bench.shard_urls([build_source(spec, tmp_path / "shards")])
    source = {key: (image, pool) for url in urls for key, _, image, pool in _baseline().read_samples(url)}
    assert len(source) == 8 and all(len(pool) == 3 for _, pool in source.values())

    paths, per_pass = _baseline().write_caption_pool(urls, tmp_path / "pool", passes=6)
    assert per_pass == 8 and len(paths) == 6 * len(urls)
    drawn: dict[str, set] = {key: set() for key in source}
    for p in range(6):
        seen = []
        for path in paths[p * len(urls):(p + 1) * len(urls)]:
            with tarfile.open(path) as tar:
                names = tar.getnames()
                keys = sorted({n.split(".", 1)[0] for n in names})
                for key in keys:  # what open_clip_train reads: an image and a .txt caption
                    image = tar.extractfile(f"{key}.jpg").read()
                    caption = tar.extractfile(f"{key}.txt").read().decode()
                    original = key.rsplit("_p", 1)[0]
                    assert key == f"{original}_p{p}" and image == source[original][0]
                    assert caption in source[original][1]
                    drawn[original].add(caption)
                    seen.append(original)
        assert sorted(seen) == sorted(source)  # every image once per pass
    # uniform draws over 3 captions in 6 passes: the label captions are used, not only the radiologist's
    assert sum(len(d) for d in drawn.values()) > 8 + 4
    # more passes later keep the earlier passes' draws
    again, _ = _baseline().write_caption_pool(urls, tmp_path / "pool2", passes=2)
    for a, b in zip(again, paths):
        with tarfile.open(a) as ta, tarfile.open(b) as tb:
            assert [(m.name, ta.extractfile(m).read()) for m in ta.getmembers()] == \
                   [(m.name, tb.extractfile(m).read()) for m in tb.getmembers()]


def test_every_seed_and_caption_set_gets_its_steps_and_shards(tmp_path, monkeypatch, capsys):
    """The comparison's plan, with the training runs replaced by recorders: medclip trains to the budget
    for every seed, each baseline model is calibrated once and trained on both caption sets."""
    from medclip.training.prepare import BuildSpec, build_source

    medpix = require_shared("medpix")
    rows = [json.loads(line) for line in (medpix / "dev.jsonl").read_text().splitlines()[:4]]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n" for r in rows))
    manifest = build_source(BuildSpec(name="mini", input=str(table), max_side=32,
                                      label_captions=["{modality} image."]), tmp_path / "built")
    bench = _bench()
    calls = {"medclip": [], "calibrations": [], "baselines": []}
    monkeypatch.setattr(bench, "build_shards", lambda recipe, root: [manifest])
    monkeypatch.setattr(bench, "train_medclip",
                        lambda args, seed, steps, *a: calls["medclip"].append((seed, steps)) or (1.0, 70 + seed))
    monkeypatch.setattr(bench, "calibrate_baseline",
                        lambda settings, model, *a: calls["calibrations"].append(model) or 5)

    def train_baseline(settings, model, shards, steps, logs):
        calls["baselines"].append((settings.run.seed, model, logs.name, steps, shards))
        return 2.0, logs / "epoch_1.pt"

    monkeypatch.setattr(bench, "train_baseline", train_baseline)
    monkeypatch.setattr(bench, "export_baseline", lambda model, checkpoint, directory: directory)
    monkeypatch.setattr(bench, "run_timed", lambda cmd, log: 0.0)

    class EveryModel(dict):  # the eval run's headlines: the same score for every exported model
        def get(self, key, default=None):
            return {"medpix_modality": 0.5}

    monkeypatch.setattr(bench, "headlines", lambda eval_dir: EveryModel())
    assert bench.main(["--seeds", "0", "1", "--out", str(tmp_path / "out"), "--baseline-model", "medclip-small",
                       "--baseline-model", "medclip-small-resnet18@16"]) == 0

    assert calls["medclip"] == [(0, None), (1, None)]  # held to the budget by medclip itself
    assert calls["calibrations"] == ["medclip-small", "medclip-small-resnet18"]
    assert len(calls["baselines"]) == 2 * 2 * 2
    urls = bench.shard_urls([manifest])
    for seed, model, name, steps, shards in calls["baselines"]:
        assert name.endswith(f"-s{seed}") and steps == 5
        if "-radiologist-" in name:
            assert shards == urls
        else:  # enough pool passes for the run's samples: 5 steps x batch 32 (or 16) of 4 images
            assert "-pool-" in name and all("caption_pool" in s for s in shards)
            assert len(shards) >= math.ceil(5 * (16 if "resnet18" in model else 32) / 4) * len(urls)
    out = capsys.readouterr().out
    assert "what the engine adds (medclip - open_clip_train medclip-small (batch 32, caption pool))" in out
    assert "(70, 71 steps)" in out  # each seed's steps, as its budgeted run planned them
