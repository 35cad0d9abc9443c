"""The shared_real comparison gives open_clip_train the recipe's optimiser and batch settings."""

import importlib.util
from pathlib import Path

import pytest
from open_clip_train.params import parse_args

from medclip.training.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("shared_real_bench", ROOT / "bench" / "shared_real_vs_open_clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_baseline_runs_the_recipes_optimiser(tmp_path):
    bench = _bench()
    recipe = load_recipe(ROOT / "pretrain" / "shared_real.yaml",
                         ["optim.beta1=0.8", "optim.beta2=0.95", "optim.eps=1e-7", "optim.lr=2e-3"])
    # "vit" in the name would make open_clip_train choose 0.9 / 0.98 / 1e-6 on its own
    model, settings = bench.baseline_settings(recipe, "ViT-B-32@64")
    args = parse_args(bench.baseline_argv(settings, model, ["a.tar"], 300, tmp_path, "baseline"))
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
