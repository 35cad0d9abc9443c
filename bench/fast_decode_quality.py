"""Does the reduced JPEG decode (``data.fast_decode``) change what a model learns? shared_real, on vs off.

The shared images are stored at <= 256 px, where the 128 px recipe's crops are never reduced. So the
MedPix and COVID-CXR train images are first upscaled ``--upscale`` times (bicubic, JPEG q90; 3x gives
~770-900 px sides, decoded at 1/4 with fast decode), then ``pretrain/shared_real.yaml`` is trained on
them with ``max_side`` off (the shards keep that size), once with ``data.fast_decode=true`` and once with
``false`` per seed, and every model is evaluated by one ``medclip eval suite shared_real`` command (the
original dev / test images). Printed: each headline per seed and the on - off difference next to the
spread between seeds.

    .venv/bin/python bench/fast_decode_quality.py --seeds 0 1 2 [--jobs 2] [--steps 460]

About 2 x seeds runs of the recipe (~10 min each on an idle 2-core machine), ``--jobs`` at a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from PIL import Image

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import shared_real_vs_open_clip as srv  # noqa: E402  (shard build, run dirs, headlines: one implementation)

REPO, BIN = srv.REPO, srv.BIN
RECIPE = REPO / "pretrain" / "shared_real.yaml"


def upscaled_table(table: Path, out: Path, factor: float) -> Path:
    """``table`` with each image upscaled ``factor`` times into ``out`` (JPEG q90); reused when present."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for line in table.read_text().splitlines():
        row = json.loads(line)
        target = out / Path(row["image"]).with_suffix(".jpg").name
        if not target.is_file():
            with Image.open(table.parent / row["image"]) as im:
                im = im.convert("RGB")
                im.resize((round(im.width * factor), round(im.height * factor)), Image.BICUBIC).save(
                    target, format="JPEG", quality=90)
        rows.append({**row, "image": str(target)})
    path = out / table.name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def derived_recipe(out: Path, factor: float) -> Path:
    """shared_real.yaml reading the upscaled tables at their size (max_side off)."""
    recipe = yaml.safe_load(RECIPE.read_text())
    for spec in recipe["data"]["build"]:
        table = (REPO / spec["input"]).resolve()
        spec["input"] = str(upscaled_table(table, out / "upscaled" / table.parent.name, factor))
        spec["max_side"] = None
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(recipe: Path, run_dir: Path, shards: Path, seed: int, fast: bool, steps: int | None) -> Path:
    srv.fresh_run_dir(run_dir, shards)
    cmd = [str(BIN / "medclip"), "pretrain", "--config", str(recipe), "--set", f"run.output_dir={run_dir}",
           "--set", f"run.seed={seed}", "--set", f"data.fast_decode={str(fast).lower()}", "--set", "eval.suites=[]",
           "--set", "run.progress=false"]
    if steps:
        cmd += ["--set", f"run.steps={steps}"]
    wall = srv.run_timed(cmd, run_dir.parent / f"{run_dir.name}.log")
    print(f"seed {seed} fast_decode={fast}: trained in {wall:.0f}s wall", flush=True)
    return run_dir / "export"


def mean_sd(values: list[float]) -> str:
    """``mean ± sd`` (sd over seeds; a single seed has none)."""
    sd = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{sd}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--upscale", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=None, help="override run.steps (default: the recipe's)")
    parser.add_argument("--jobs", type=int, default=2, help="training runs at a time")
    parser.add_argument("--out", default=str(REPO / "runs" / "fast_decode_quality"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from medclip.training.config import load_recipe

    out = Path(args.out).resolve()
    recipe = derived_recipe(out, args.upscale)
    shards = out / "shards"
    srv.build_shards(load_recipe(recipe), shards)
    runs = [(seed, fast) for seed in args.seeds for fast in (True, False)]
    with ThreadPoolExecutor(args.jobs) as pool:
        exports = dict(zip(runs, pool.map(lambda r: train(recipe, out / f"s{r[0]}-{'on' if r[1] else 'off'}",
                                                          shards, r[0], r[1], args.steps), runs)))
    eval_dir = out / "eval"
    cmd = [str(BIN / "medclip"), "eval", "suite", "shared_real", "--out", str(eval_dir), "--no-plots",
           "--no-progress", "--workers", "1"]
    for path in exports.values():
        cmd += ["--model", str(path)]
    srv.run_timed(cmd, out / "eval.log")
    results = srv.headlines(eval_dir)
    scores = {run: results.get(str(path), {}) for run, path in exports.items()}
    datasets = sorted(set.intersection(*(set(s) for s in scores.values())))
    print(f"shared_real on {args.upscale:g}x upscaled train images; seeds {args.seeds}; headline per dataset, "
          "mean ± sd over seeds")
    print("| dataset | fast_decode on | fast_decode off | on - off | per seed on / off |")
    print("|---|---|---|---|---|")
    for name in datasets:
        on = [scores[(s, True)][name] for s in args.seeds]
        off = [scores[(s, False)][name] for s in args.seeds]
        per_seed = ", ".join(f"{a:.3f} / {b:.3f}" for a, b in zip(on, off))
        print(f"| {name} | {mean_sd(on)} | {mean_sd(off)} | {statistics.fmean(on) - statistics.fmean(off):+.3f} "
              f"| {per_seed} |")
    (out / "quality.json").write_text(json.dumps({f"s{s}-{'on' if f else 'off'}": v for (s, f), v in scores.items()},
                                                 indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
