"""medclip's shared_real recipe vs open_clip_train on the same shards, for the same wall-clock budget.

Every side is held to ``--budget`` seconds for its whole training process and is charged for the same
things: process start-up, data loading, training and saving the model. Nobody is charged for the shard
build (done once, before any timed run) or for evaluation (one common command at the end).

1. Shards: the recipe's ``data.build`` tables (../shared/data) are converted once, with concept
   annotation, into ``OUT/shards``; every medclip run reuses them (``data.build``'s build key).
2. medclip: ``medclip pretrain --config pretrain/shared_real.yaml`` with ``eval.suites=[]``, held to the
   budget by medclip itself: ``run.budget_seconds`` with ``run.budget_from=process`` (the clock starts with
   the process, so start-up and data loading are charged as for the baseline); the run measures its step
   time as it goes and plans the steps whose complete schedule, final checkpoint and export fit
   (``medclip.training.budget``; the recipe's ``run.steps`` is only its first plan). Its log says how much
   of the budget it used.
3. open_clip_train (the reference): its own ``main`` on those shards, for each ``--baseline-model``
   (default ``medclip-small``, the 6-layer 256-wide ViT at 128 px the issue names; give the recipe's own
   model too to compare on the same architecture; names are registered with open_clip by importing
   medclip), with the recipe's batch size (or ``MODEL@BATCH``'s, with the warmup kept in samples),
   learning rate, weight decay, Adam betas and eps, and warmup, fp32, one loader worker, given the steps
   that fit in the budget by a short calibration run (its own ``Batch (t)``; open_clip_train cannot plan
   its steps itself). Each model is trained on two caption sets (``--baseline-data``):
   - ``radiologist``: the shards as they are; open_clip_train reads the ``.txt`` member, the
     radiologist's caption, and nothing else;
   - ``pool``: data parity. medclip draws one caption per visit, uniformly from the sample's caption
     pool (the radiologist's caption and the label-derived captions of ``data.build``), and reads every
     image once per pass. The pool shards give open_clip_train the same: pass ``p`` holds every image
     once with a caption drawn uniformly from its pool (seeded), with as many passes as its steps need.
   medclip vs ``pool`` is what the engine adds (same data); ``pool`` vs ``radiologist`` is what the
   label captions add.
4. All final models are evaluated by one ``medclip eval suite shared_real`` command (MedPix dev, COVID-19
   test: zero-shot, retrieval, linear probes; same settings for all), and the script prints the table,
   the differences and that decomposition.

The full table (README), on an otherwise idle machine (both sides are timed), about 2 x (10 + 4 x 10 + 4)
minutes:

    .venv/bin/python bench/shared_real_vs_open_clip.py --seeds 0 1 --budget 600 \
        --baseline-model medclip-small@64 --baseline-model medclip-small-resnet18

Other uses:

    .venv/bin/python bench/shared_real_vs_open_clip.py --budget 120 --seeds 0     # a smoke check (~15 min)
    .venv/bin/python bench/shared_real_vs_open_clip.py --medclip-run runs/shared_real   # reuse a finished run
    .venv/bin/python bench/shared_real_vs_open_clip.py --baseline-data pool        # only the parity baseline

Takes about seeds x budget x (1 + baselines x data sets) + 1.5 minutes per baseline calibration + the shard build
+ the evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _open_clip_baseline import (  # noqa: E402  (the reference's side: one implementation for every bench)
    BIN,
    REPO,
    BaselineShards,
    baseline_settings,
    build_shards,
    calibrate_baseline,
    export_baseline,
    headlines,
    run_timed,
    shard_urls,
    train_baseline,
)

BASELINE_DATA = {"radiologist": "radiologist caption", "pool": "caption pool"}


# ------------------------------------------------------------------------------------------- medclip
def medclip_command(args, run_dir: Path, seed: int, steps: int | None, extra: list[str] = ()) -> list[str]:
    """``medclip pretrain`` held to ``steps``, or (None) to ``--budget`` for its whole process, without in-run
    evaluation (all models are evaluated alike)."""
    held = [f"run.steps={steps}"] if steps else [f"run.budget_seconds={args.budget}", "run.budget_from=process"]
    cmd = [str(BIN / "medclip"), "pretrain", "--config", args.recipe, "--set", f"run.output_dir={run_dir}",
           "--set", f"run.seed={seed}", "--set", "eval.suites=[]", "--set", "run.progress=false"]
    for item in held:
        cmd += ["--set", item]
    for item in [*args.overrides, *extra]:
        cmd += ["--set", item]
    return cmd


def fresh_run_dir(run_dir: Path, shards_root: Path) -> None:
    """An empty run directory whose shards/ is the prebuilt one (reused by data.build's key)."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "shards").symlink_to(shards_root.resolve(), target_is_directory=True)


def budget_used(log_jsonl: Path) -> tuple[int, float | None]:
    """(steps trained, seconds of the budget used) from a medclip run's log."""
    records = [json.loads(line) for line in log_jsonl.read_text().splitlines() if line.strip()]
    steps = max((r["step"] for r in records if "loss" in r), default=0)
    used = next((r["budget_used_s"] for r in reversed(records) if "budget_used_s" in r), None)
    return steps, used


def train_medclip(args, seed: int, steps: int | None, shards_root: Path, run_dir: Path,
                  log_path: Path) -> tuple[float, int]:
    """(wall seconds, steps trained) of one timed medclip run, held to ``steps`` or (None) to the budget."""
    fresh_run_dir(run_dir, shards_root)
    wall = run_timed(medclip_command(args, run_dir, seed, steps), log_path)
    if "building shards" in log_path.read_text():
        raise SystemExit(f"medclip rebuilt its shards in the timed run (see {log_path}): the build key did not match")
    trained, used = budget_used(run_dir / "log.jsonl")
    held = f"{used:.1f}s of its {args.budget:.0f}s budget used" if used is not None else f"budget {args.budget:.0f}s"
    print(f"medclip pretrain ({args.recipe}) seed {seed}: {trained} steps in {wall:.1f}s wall "
          f"({held}; start-up, training and export, no shard build, no evaluation)")
    return wall, trained


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Mean over seeds of each dataset's headline (datasets every seed has)."""
    names = set.intersection(*(set(h) for h in per_seed.values()))
    return {name: statistics.fmean(h[name] for h in per_seed.values()) for name in sorted(names)}


def print_table(systems: dict[str, dict], budget: float) -> None:
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
    print(f"wall clock per seed (budget {budget:.0f}s): " + "; ".join(
        f"{label} " + ", ".join("reused" if w is None else f"{w:.0f}s" for w in s["wall_s"].values())
        + f" ({s['steps']} steps)" for label, s in systems.items()))
    print_decomposition(systems, ours, datasets)


def print_decomposition(systems: dict[str, dict], ours: str, datasets: list[str]) -> None:
    """Per baseline model trained on both caption sets: engine = medclip - pool, data = pool - radiologist."""
    pairs = [(label, other) for label, s in systems.items() if s.get("data") == "pool"
             for other, t in systems.items()
             if t.get("data") == "radiologist" and (t["model"], t["batch"]) == (s["model"], s["batch"])]
    for pool, radiologist in pairs:
        print(f"\nwhat the engine adds (medclip - {pool}) | what the label captions add "
              f"({pool} - {radiologist}), headline points")
        for name in datasets:
            m, q, r = (systems[k]["mean"].get(name) for k in (ours, pool, radiologist))
            if None not in (m, q, r):
                print(f"{name} | {100 * (m - q):+.1f} | {100 * (q - r):+.1f}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain/shared_real.yaml")
    parser.add_argument("--budget", type=float, default=600.0, help="wall-clock seconds for each side's training")
    parser.add_argument("--out", default="runs/compare_shared_real")
    parser.add_argument("--medclip-run", default=None, help="reuse this finished medclip run (not timed again)")
    parser.add_argument("--medclip-steps", type=int, default=None,
                        help="train this many steps instead of holding medclip to --budget (run.budget_seconds)")
    parser.add_argument("--baseline-model", action="append", default=None, metavar="MODEL[@BATCH]",
                        help="architecture(s) open_clip_train trains, optionally at another batch size "
                             "(repeatable; default medclip-small at the recipe's batch size)")
    parser.add_argument("--baseline-data", nargs="+", choices=list(BASELINE_DATA), default=list(BASELINE_DATA),
                        help="caption sets each baseline model trains on (default both)")
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
        manifests = sorted((reused / "shards").glob("*/*.yaml"))
        if not manifests:
            raise SystemExit(f"no shard manifests under {reused / 'shards'}: is {reused} a finished shared_real run?")
        medclip_steps = recipe.run.steps
    else:
        recipe = load_recipe(REPO / args.recipe, args.overrides)
        shards_root = out / "shards"
        start = time.perf_counter()
        manifests = build_shards(recipe, shards_root)
        print(f"shards: {shards_root} ready in {time.perf_counter() - start:.0f}s (charged to no side)")
        medclip_steps = args.medclip_steps  # None: medclip holds itself to the budget
    shards = BaselineShards(shard_urls(manifests), out / "caption_pool")
    seeds = args.seeds or [recipe.run.seed]
    ours = f"medclip {recipe.model.name}"
    systems: dict[str, dict] = {ours: {"steps": medclip_steps, "wall_s": {}, "exports": {}}}
    for seed in seeds:
        if args.medclip_run:
            run_dir, wall = reused, None
        else:
            run_dir = out / f"medclip-s{seed}"
            wall, trained = train_medclip(args, seed, medclip_steps, shards_root, run_dir,
                                          out / f"medclip-s{seed}.log")
            systems[ours].setdefault("steps_by_seed", {})[seed] = trained
            systems[ours]["steps"] = ", ".join(str(n) for n in systems[ours]["steps_by_seed"].values())
        systems[ours]["wall_s"][seed] = wall
        systems[ours]["exports"][seed] = str(run_dir / "export")
        seeded = dataclasses.replace(recipe, run=dataclasses.replace(recipe.run, seed=seed))
        for spec in args.baseline_model or ["medclip-small"]:
            model, settings = baseline_settings(seeded, spec)
            batch = settings.data.batch_size
            for data in args.baseline_data:
                label = f"open_clip_train {model} (batch {batch}, {BASELINE_DATA[data]})"
                if label not in systems:
                    calibrated = next((s["steps"] for s in systems.values()
                                       if s.get("model") == model and s.get("batch") == batch), None)
                    steps = (args.baseline_steps or calibrated
                             or calibrate_baseline(settings, model, shards.urls, args.budget, out))
                    systems[label] = {"steps": steps, "wall_s": {}, "exports": {}, "model": model, "batch": batch,
                                      "data": data}
                steps = systems[label]["steps"]
                logs = out / f"open_clip_train-{model}-b{batch}-{data}-s{seed}"
                wall, checkpoint = train_baseline(settings, model, shards.for_data(data, steps * batch), steps, logs)
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
    print_table(systems, args.budget)
    (out / "comparison.json").write_text(json.dumps({"budget_s": args.budget, "seeds": seeds, "runs": systems},
                                                    indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
