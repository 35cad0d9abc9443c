"""medclip's shared_real recipe vs open_clip_train on the same shards, for the same wall-clock budget.

1. medclip: ``medclip pretrain --config pretrain/shared_real.yaml`` (shard build from ../shared/data
   with concept annotation, training, in-run evaluation and export all inside the timed command).
2. open_clip_train (the reference): its own ``main`` on the tar shards medclip just built (``.jpg`` +
   ``.txt``, the radiologist caption; it reads nothing else), for each ``--baseline-model`` (default:
   ``medclip-small``, the 6-layer 256-wide ViT at 128 px the issue names; give the recipe's own model
   too to compare on the same architecture; names are registered with open_clip by importing
   medclip), with the recipe's batch size, learning rate, weight decay and warmup, fp32, one loader
   worker. Its step count is what fits in the budget: a
   short calibration run gives the per-step time (open_clip_train's own ``Batch (t)``) and the
   start-up cost, and the full run gets ``(budget - start-up) / step time`` steps, so its cosine
   schedule ends inside the budget (stopping a longer schedule early would handicap it). The budget
   covers its whole process; it is not charged for the shard build.
3. Both final models are evaluated by one ``medclip eval suite shared_real`` command (MedPix dev,
   COVID-19 test: zero-shot, retrieval, linear probes; same settings for both), and the script prints
   the table and the differences.

    .venv/bin/python bench/shared_real_vs_open_clip.py [--budget 600] [--out runs/compare_shared_real]
    .venv/bin/python bench/shared_real_vs_open_clip.py --medclip-run runs/shared_real   # reuse a finished run

Takes about budget x (1 + baselines) + 2 minutes per baseline + 3 minutes. The machine must be otherwise idle: both sides are timed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")
CALIBRATION_STEPS = 30


def run_timed(cmd: list[str], log_path: Path) -> float:
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log_path.read_text().splitlines()[-15:]
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n" + "\n".join(tail))
    return elapsed


def open_clip_train_main(argv: list[str]) -> None:
    """Run open_clip_train's main with medclip's model configs registered (the baseline subprocess)."""
    import open_clip_train.data as data
    from open_clip_train.main import main

    import medclip  # noqa: F401  (registers medclip-* configs with open_clip)

    # open_clip_train 3.x is written for webdataset 0.2, whose tar expander has no end-of-shard marker;
    # webdataset >= 1.0 yields an empty dict there, which its grouping function cannot read. Drop the
    # markers before it; nothing else about its pipeline changes.
    group = data.group_by_keys_nothrow
    data.group_by_keys_nothrow = lambda files, *a, **k: group((f for f in files if f), *a, **k)
    main(argv)


def baseline_argv(recipe, model: str, shards: list[str], steps: int, logs: Path, name: str) -> list[str]:
    batch = recipe.data.batch_size
    return [
        "--train-data", "::".join(shards), "--dataset-type", "webdataset",
        "--train-num-samples", str(steps * batch), "--epochs", "1", "--batch-size", str(batch),
        "--model", model, "--precision", "fp32", "--workers", "1", "--seed", str(recipe.run.seed),
        "--lr", str(recipe.optim.lr), "--wd", str(recipe.optim.weight_decay),
        "--warmup", str(min(recipe.optim.warmup_steps, max(steps - 1, 0))),
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "5", "--save-frequency", "1",
        "--report-to", "", "--device", "cpu",
    ]


def train_baseline(recipe, model: str, shards: list[str], budget: float, out: Path,
                   steps: int | None) -> tuple[int, float, Path]:
    logs = out / f"open_clip_train-{model}"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    me = [sys.executable, str(Path(__file__).resolve()), "--open-clip-train"]
    if steps is None:
        argv = baseline_argv(recipe, model, shards, CALIBRATION_STEPS, logs, "calibration")
        total = run_timed(me + argv, logs / "calibration.log")
        times = [float(t) for t in BATCH_TIME.findall((logs / "calibration" / "out.log").read_text())]
        step_time = statistics.median(times[1:] or times)  # the first window holds the loader's start-up
        startup = max(total - CALIBRATION_STEPS * step_time, 0.0)
        steps = math.floor((budget - startup) / step_time)
        print(f"open_clip_train {model} calibration: {CALIBRATION_STEPS} steps in {total:.1f}s, {step_time:.3f}s/step, "
              f"start-up {startup:.1f}s -> {steps} steps fit in {budget:.0f}s")
    wall = run_timed(me + baseline_argv(recipe, model, shards, steps, logs, "baseline"), logs / "baseline.log")
    checkpoint = logs / "baseline" / "checkpoints" / "epoch_1.pt"
    print(f"open_clip_train {model}: {steps} steps of batch {recipe.data.batch_size} in {wall:.1f}s -> {checkpoint}")
    return steps, wall, checkpoint


def export_baseline(model_name: str, checkpoint: Path, directory: Path) -> Path:
    import medclip

    encoder = medclip.load(model_name, checkpoint=checkpoint)
    return medclip.save(encoder, directory)


def headlines(eval_dir: Path) -> dict[str, dict[str, float]]:
    """{model: {dataset: headline}} from the result JSONs of one eval run."""
    from medclip.evaluation.report import read_results

    out: dict[str, dict[str, float]] = {}
    for r in read_results(eval_dir):
        if r["headline"] is not None:
            out.setdefault(r["model"], {})[r["dataset"]] = r["headline"]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--open-clip-train"]:
        open_clip_train_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain/shared_real.yaml")
    parser.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds for each side")
    parser.add_argument("--out", default="runs/compare_shared_real")
    parser.add_argument("--medclip-run", default=None, help="reuse this finished medclip run (not timed again)")
    parser.add_argument("--baseline-model", action="append", default=None,
                        help="architecture(s) open_clip_train trains (repeatable; default medclip-small)")
    parser.add_argument("--baseline-steps", type=int, default=None, help="skip the calibration: train this many steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the medclip run (repeatable)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from medclip.training.config import load_recipe

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.medclip_run:
        run_dir = (REPO / args.medclip_run).resolve()
        recipe = load_recipe(run_dir / "recipe.yaml")  # the baseline copies that run's settings
        medclip_wall = None
    else:
        recipe = load_recipe(REPO / args.recipe, args.overrides)
        run_dir = out / "medclip"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        cmd = [str(BIN / "medclip"), "pretrain", "--config", args.recipe, "--set", f"run.output_dir={run_dir}"]
        for item in args.overrides:
            cmd += ["--set", item]
        medclip_wall = run_timed(cmd, out / "medclip.log")
        print(f"medclip pretrain ({args.recipe}): {recipe.run.steps} steps in {medclip_wall:.1f}s wall "
              f"(shard build, training, evaluation, export)")
    shards = sorted(str(p) for p in (run_dir / "shards").glob("*/*.tar"))
    if not shards:
        raise SystemExit(f"no shards under {run_dir / 'shards'}: is {run_dir} a finished shared_real run?")
    baselines = {}  # label -> (steps, wall, export dir)
    for model in args.baseline_model or ["medclip-small"]:
        steps, wall, checkpoint = train_baseline(recipe, model, shards, args.budget, out, args.baseline_steps)
        export = export_baseline(model, checkpoint, out / f"open_clip_train-{model}" / "export")
        baselines[f"open_clip_train {model}"] = (steps, wall, export)

    eval_dir = out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    models = {f"medclip {recipe.model.name}": str(run_dir / "export"),
              **{label: str(export) for label, (_, _, export) in baselines.items()}}
    cmd = [str(BIN / "medclip"), "eval", "suite", "shared_real", "--out", str(eval_dir), "--no-plots",
           "--no-progress", "--workers", "1"]
    for path in models.values():
        cmd += ["--model", path]
    run_timed(cmd, out / "eval.log")
    results = headlines(eval_dir)
    scores = {label: results.get(path, {}) for label, path in models.items()}
    ours = next(iter(scores))
    datasets = sorted({name for s in scores.values() for name in s})
    print("\n" + " | ".join(["dataset (headline, %)"] + list(scores)))
    for name in datasets:
        cells = []
        for label, s in scores.items():
            value = s.get(name)
            cell = "n/a" if value is None else f"{100 * value:.1f}"
            if label != ours and value is not None and scores[ours].get(name) is not None:
                cell += f" ({100 * (scores[ours][name] - value):+.1f})"
            cells.append(cell)
        print(" | ".join([name] + cells))
    print("(in brackets: medclip minus that baseline)")
    wall = "reused run" if medclip_wall is None else f"{medclip_wall:.0f}s"
    print(f"wall clock: medclip {wall} ({recipe.run.steps} steps); "
          + "; ".join(f"{label} {w:.0f}s ({n} steps)" for label, (n, w, _) in baselines.items())
          + f"; budget {args.budget:.0f}s each")
    (out / "comparison.json").write_text(json.dumps({
        "budget_s": args.budget,
        "runs": {ours: {"wall_s": medclip_wall, "steps": recipe.run.steps, "headlines": scores[ours]},
                 **{label: {"wall_s": w, "steps": n, "headlines": scores[label]}
                    for label, (n, w, _) in baselines.items()}}}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
