"""medclip's shared_real recipe vs open_clip_train on the same shards, for the same wall-clock budget.

1. medclip: ``medclip pretrain --config pretrain/shared_real.yaml`` (shard build from ../shared/data
   with concept annotation, training, in-run evaluation and export all inside the timed command).
2. open_clip_train (the reference): its own ``main`` on the tar shards medclip just built (``.jpg`` +
   ``.txt``, the radiologist caption; it reads nothing else), for each ``--baseline-model`` (default:
   ``medclip-small``, the 6-layer 256-wide ViT at 128 px the issue names; give the recipe's own model
   too to compare on the same architecture; names are registered with open_clip by importing
   medclip), with the recipe's batch size (or ``MODEL@BATCH``'s, with the warmup kept in samples),
   learning rate, weight decay, Adam betas and eps, and warmup, fp32, one loader worker. Its step
   count is what fits in the budget: a
   short calibration run gives the per-step time (open_clip_train's own ``Batch (t)``) and the
   start-up cost, and the full run gets ``(budget - start-up) / step time`` steps, so its cosine
   schedule ends inside the budget (stopping a longer schedule early would handicap it). The budget
   covers its whole process; it is not charged for the shard build.
3. Both final models are evaluated by one ``medclip eval suite shared_real`` command (MedPix dev,
   COVID-19 test: zero-shot, retrieval, linear probes; same settings for both), and the script prints
   the table and the differences.

    .venv/bin/python bench/shared_real_vs_open_clip.py [--budget 600] [--out runs/compare_shared_real]
    .venv/bin/python bench/shared_real_vs_open_clip.py --seeds 0 1   # every side once per seed; mean and per-seed
    .venv/bin/python bench/shared_real_vs_open_clip.py --medclip-run runs/shared_real   # reuse a finished run

Takes about seeds x budget x (1 + baselines) + 2 minutes per baseline + 3 minutes. The machine must be otherwise idle: both sides are timed.
"""

from __future__ import annotations

import argparse
import dataclasses
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
SELF = [sys.executable, str(Path(__file__).resolve()), "--open-clip-train"]


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
        # Explicit betas / eps: open_clip_train would otherwise pick them by whether "vit" is in the name.
        "--lr", str(recipe.optim.lr), "--wd", str(recipe.optim.weight_decay), "--beta1", str(recipe.optim.beta1),
        "--beta2", str(recipe.optim.beta2), "--eps", str(recipe.optim.eps),
        "--warmup", str(min(recipe.optim.warmup_steps, max(steps - 1, 0))),
        "--logs", str(logs), "--name", name, "--log-every-n-steps", "5", "--save-frequency", "1",
        "--report-to", "", "--device", "cpu",
    ]


def baseline_settings(recipe, spec: str):
    """``MODEL`` or ``MODEL@BATCH`` -> (model, the recipe with that batch size). Another batch size
    keeps the warmup's length in samples."""
    model, _, batch = spec.partition("@")
    if not batch:
        return model, recipe
    try:
        size = int(batch)
    except ValueError:
        raise SystemExit(f"--baseline-model {spec}: the batch size after '@' must be an integer") from None
    warmup = round(recipe.optim.warmup_steps * recipe.data.batch_size / size)
    return model, dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, batch_size=size),
                                      optim=dataclasses.replace(recipe.optim, warmup_steps=warmup))


def calibrate_baseline(recipe, model: str, shards: list[str], budget: float, out: Path) -> int:
    """Steps of ``model`` that fit in the budget, from a short timed open_clip_train run."""
    logs = out / f"open_clip_train-{model}-b{recipe.data.batch_size}-calibration"
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    argv = baseline_argv(recipe, model, shards, CALIBRATION_STEPS, logs, "calibration")
    total = run_timed(SELF + argv, logs / "calibration.log")
    times = [float(t) for t in BATCH_TIME.findall((logs / "calibration" / "out.log").read_text())]
    step_time = statistics.median(times[1:] or times)  # the first window holds the loader's start-up
    startup = max(total - CALIBRATION_STEPS * step_time, 0.0)
    steps = math.floor((budget - startup) / step_time)
    print(f"open_clip_train {model} calibration: {CALIBRATION_STEPS} steps in {total:.1f}s, {step_time:.3f}s/step, "
          f"start-up {startup:.1f}s -> {steps} steps fit in {budget:.0f}s")
    return steps


def train_baseline(recipe, model: str, shards: list[str], steps: int, logs: Path) -> tuple[float, Path]:
    if logs.exists():
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    wall = run_timed(SELF + baseline_argv(recipe, model, shards, steps, logs, "baseline"), logs / "baseline.log")
    checkpoint = logs / "baseline" / "checkpoints" / "epoch_1.pt"
    print(f"open_clip_train {model} seed {recipe.run.seed}: {steps} steps of batch {recipe.data.batch_size} "
          f"in {wall:.1f}s -> {checkpoint}")
    return wall, checkpoint


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


def train_medclip(args, seed: int, run_dir: Path, log_path: Path) -> float:
    if run_dir.exists():
        shutil.rmtree(run_dir)
    cmd = [str(BIN / "medclip"), "pretrain", "--config", args.recipe, "--set", f"run.output_dir={run_dir}",
           "--set", f"run.seed={seed}"]
    for item in args.overrides:
        cmd += ["--set", item]
    wall = run_timed(cmd, log_path)
    print(f"medclip pretrain ({args.recipe}) seed {seed}: {wall:.1f}s wall (shard build, training, evaluation, export)")
    return wall


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of each dataset's headline (datasets every seed has)."""
    names = set.intersection(*(set(h) for h in per_seed.values()))
    return {name: statistics.fmean(h[name] for h in per_seed.values()) for name in sorted(names)}


def print_table(systems: dict[str, dict]) -> None:
    labels = list(systems)
    ours = labels[0]
    datasets = sorted(systems[ours]["mean"])
    print("\n" + " | ".join(["dataset (headline %, mean [seeds])"] + labels))
    for name in datasets:
        row = [name]
        for label in labels:
            mean = systems[label]["mean"].get(name)
            if mean is None:
                row.append("n/a")
                continue
            values = [h[name] for h in systems[label]["headlines"].values()]
            text = f"{100 * mean:.1f}"
            if len(values) > 1:
                text += " [" + ", ".join(f"{100 * v:.1f}" for v in values) + "]"
            if label != ours:
                text += f" ({100 * (systems[ours]['mean'][name] - mean):+.1f})"
            row.append(text)
        print(" | ".join(row))
    print("(in brackets after a baseline: medclip's mean minus that baseline's mean)")
    print("wall clock per seed: " + "; ".join(
        f"{label} " + ", ".join("reused" if w is None else f"{w:.0f}s" for w in s["wall_s"].values())
        + f" ({s['steps']} steps)" for label, s in systems.items()))


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
    parser.add_argument("--baseline-model", action="append", default=None, metavar="MODEL[@BATCH]",
                        help="architecture(s) open_clip_train trains, optionally at another batch size "
                             "(repeatable; default medclip-small at the recipe's batch size)")
    parser.add_argument("--baseline-steps", type=int, default=None, help="skip the calibration: train this many steps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override for the medclip run (repeatable)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="train every side once per seed (default: the recipe's run.seed)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from medclip.training.config import load_recipe

    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.medclip_run:
        if args.seeds and len(args.seeds) > 1:
            raise SystemExit("--medclip-run reuses one run: give at most one --seeds value")
        reused = (REPO / args.medclip_run).resolve()
        recipe = load_recipe(reused / "recipe.yaml")  # the baseline copies that run's settings
    else:
        recipe = load_recipe(REPO / args.recipe, args.overrides)
    seeds = args.seeds or [recipe.run.seed]
    ours = f"medclip {recipe.model.name}"
    systems: dict[str, dict] = {ours: {"steps": recipe.run.steps, "wall_s": {}, "exports": {}}}
    shards: list[str] = []
    for seed in seeds:
        if args.medclip_run:
            run_dir, wall = reused, None
        else:
            run_dir = out / f"medclip-s{seed}"
            wall = train_medclip(args, seed, run_dir, out / f"medclip-s{seed}.log")
        systems[ours]["wall_s"][seed] = wall
        systems[ours]["exports"][seed] = str(run_dir / "export")
        shards = sorted(str(p) for p in (run_dir / "shards").glob("*/*.tar"))
        if not shards:
            raise SystemExit(f"no shards under {run_dir / 'shards'}: is {run_dir} a finished shared_real run?")
        # Shard builds are deterministic, so every seed's baseline reads the same shards.
        seeded = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, seed=seed))
        for spec in args.baseline_model or ["medclip-small"]:
            model, settings = baseline_settings(seeded, spec)
            label = f"open_clip_train {model} (batch {settings.data.batch_size})"
            logs = out / f"open_clip_train-{model}-b{settings.data.batch_size}-s{seed}"
            if label not in systems:
                steps = args.baseline_steps or calibrate_baseline(settings, model, shards, args.budget, out)
                systems[label] = {"steps": steps, "wall_s": {}, "exports": {}}
            wall, checkpoint = train_baseline(settings, model, shards, systems[label]["steps"], logs)
            systems[label]["wall_s"][seed] = wall
            systems[label]["exports"][seed] = str(export_baseline(model, checkpoint, logs / "export"))

    eval_dir = out / "eval"
    if eval_dir.exists():
        shutil.rmtree(eval_dir)
    cmd = [str(BIN / "medclip"), "eval", "suite", "shared_real", "--out", str(eval_dir), "--no-plots",
           "--no-progress", "--workers", "1"]
    for system in systems.values():
        for path in system["exports"].values():
            cmd += ["--model", path]
    run_timed(cmd, out / "eval.log")
    results = headlines(eval_dir)
    for system in systems.values():
        system["headlines"] = {seed: results.get(path, {}) for seed, path in system["exports"].items()}
        system["mean"] = summarise(system["headlines"])
    print_table(systems)
    (out / "comparison.json").write_text(json.dumps({"budget_s": args.budget, "seeds": seeds, "runs": systems},
                                                    indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
