"""Fine-tuning a trained medclip model on the COVID-19 train split: full, LiT and LoRA, each with an EMA,
against the starting model, on the COVID-19 test split (issue 25, item 6).

Public weights cannot be downloaded here, so the starting model is the export of
``medclip pretrain --config shared_real`` (MedPix + COVID-19 train, random init). Every mode runs the
shipped recipe (``pretrain/finetune_{full,lit,lora}.yaml``) unchanged except for ``model.checkpoint``,
``run.seed``, an EMA (``optim.ema_decay``, exported raw: the run's own final evaluation scores raw and
EMA weights) and the output directory. No setting was chosen on the test split: the recipes' values are
the ones they ship with.

Reported, COVID-19 test (n = 154 before the suite's class filters), mean ± std over the fine-tuning seeds:

* zero-shot finding and view (balanced accuracy), the finding's COVID-19-vs-rest AUC (zero-shot scores;
  steadier than the balanced accuracy, whose six minority findings have 1-4 test images each),
  text->image retrieval R@5, the full-data view probe —
  raw and EMA weights, from each run's final evaluation (suite ``covid``);
* k-shot (k = 1, 2, 4, 8, 16 per class; probe seeds 0-2) sklearn probe and Tip-Adapter on the finding and
  view labels, on the exported (raw) weights, through ``medclip eval linear-probe``;
* trainable / total parameters, peak memory and wall time of each run (from its log).

    .venv/bin/python bench/finetune_covid.py --start runs/shared_real/export --seeds 0 1 2
    .venv/bin/python bench/finetune_covid.py --report     # the tables of the runs finished so far
    .venv/bin/python bench/finetune_covid.py --dev --modes lora --set optim.lr=5e-4 --out runs/ftdev/lr5e-4

``--dev`` is where settings are chosen: it fine-tunes on 80 % of the train split's patients and evaluates
on the other 20 % (bench/_finetune_dev.py), no few-shot tables, and the test split is not read. The start
model (``shared_real``) was pretrained on the whole train split, dev patients included, so its own dev
scores (retrieval above all) are optimistic; compare fine-tuning settings with each other there.

Each finished run is kept (OUT/MODE-seedS.json) and skipped when the command is run again.

About (1 + modes x seeds) x (fine-tune ~3 min + evaluation ~1 min) on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import shared_real_vs_open_clip as srv  # noqa: E402  (command runner and result reader: one implementation)
from _finetune_dev import write_dev_split  # noqa: E402

REPO, BIN = srv.REPO, srv.BIN
MODES = ("full", "lit", "lora")
SHOTS = (1, 2, 4, 8, 16)
FEW_SHOT_DATASETS = ("covid_finding_probe", "covid_view_probe")
PROBE_METHODS = ("sklearn", "tip-adapter")
MAIN_COLUMNS = {"covid_finding": "finding zs", "covid_finding_auc": "COVID-19 vs rest AUC (zs)", "covid_view": "view zs",
                "covid_retrieval": "image R@5 (text->image)", "covid_view_probe": "view probe (all)"}


def headlines(eval_dir: Path) -> dict[str, float]:
    """{dataset: headline} of the one model evaluated in ``eval_dir``, plus the finding zero-shot's one-vs-rest
    AUC of COVID-19 (covid_finding_auc): the other findings have 1-4 test images each, so the balanced accuracy
    moves by 1/7 with one image of them, while COVID-19 against the rest ranks 100+ images against 16."""
    from medclip.evaluation.report import read_results

    per_dataset: dict[str, float] = {}
    for record in read_results(eval_dir):  # one model per folder: the records are its datasets
        if record["headline"] is not None:
            per_dataset[record["dataset"]] = record["headline"]
        if record["dataset"] == "covid_finding":
            covid = record["classnames"].index("COVID-19 pneumonia")  # the suite's name of COVID-19
            per_dataset["covid_finding_auc"] = record["details"]["per_class_auc"][covid]
    return per_dataset


def few_shot(model: Path, suite: str, out: Path, logs: Path) -> dict[str, dict[str, tuple[float, float]]]:
    """{dataset/method: {k: (mean, std) of lp_mean_per_class_recall over probe seeds}} plus the
    adapter's zero-shot classifier alone on the same test samples under dataset/zero-shot."""
    from medclip.evaluation.report import read_results

    table: dict[str, dict[str, tuple[float, float]]] = {}
    for method in PROBE_METHODS:
        where = out / method
        srv.run_timed([str(BIN / "medclip"), "eval", "suite", suite, "--datasets", *FEW_SHOT_DATASETS,
                    "--model", str(model), "--shots", *map(str, SHOTS), "--fractions", "--seeds", "0", "1", "2",
                    "--probe-method", method, "--out", str(where), "--force", "--no-plots", "--no-progress"],
                   logs / f"{out.name}-{method}.log")
        for record in read_results(where):
            settings = record["details"]["settings"]
            table[f"{record['dataset']}/{method}"] = {
                str(k): (settings[f"{k}-shot"]["mean"]["lp_mean_per_class_recall"],
                    settings[f"{k}-shot"]["std"]["lp_mean_per_class_recall"]) for k in SHOTS}
            if method == "tip-adapter":
                table[f"{record['dataset']}/zero-shot"] = {
                    str(k): (settings[f"{k}-shot"]["mean"]["zs_mean_per_class_recall"], 0.0) for k in SHOTS}
    return table


def run_facts(run_dir: Path) -> dict[str, float]:
    """Trainable / total parameters, peak memory and steps from a run's log.jsonl."""
    facts: dict[str, float] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if key in ("trainable_params", "total_params") or key.startswith("peak_"):
                facts[key] = value
        if "loss" in record:
            facts["steps"] = record["step"]
    return facts


def fine_tune(args, mode: str, seed: int, shards: Path, out: Path) -> dict:
    """One fine-tuning run and its evaluation (kept in OUT/MODE-seedS.json: a rerun skips finished runs)."""
    saved = out / f"{mode}-seed{seed}.json"
    if saved.is_file():
        return reused(saved, args.suite)
    run_dir = out / f"{mode}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "shards").symlink_to(shards.resolve(), target_is_directory=True)
    overrides = [f"model.checkpoint={args.start.resolve()}", f"run.seed={seed}", f"run.output_dir={run_dir}",
                 f"optim.ema_decay={args.ema_decay}", "optim.ema_export=false", "run.progress=false",
                 *args.overrides]
    cmd = [str(BIN / "medclip"), "pretrain", "--config", args.configs[mode]]
    for item in overrides:
        cmd += ["--set", item]
    wall = srv.run_timed(cmd, out / f"{mode}-seed{seed}.log")
    steps = run_facts(run_dir)["steps"]
    evals = run_dir / "eval"
    result = {"suite": args.suite, "wall_s": wall, **run_facts(run_dir),
              "raw": headlines(evals / f"step_{steps}"), "ema": headlines(evals / f"step_{steps}-ema")}
    result["few_shot"] = ({} if args.dev else
                          few_shot(run_dir / "export", args.suite, out / f"{mode}-seed{seed}-fewshot", out))
    saved.write_text(json.dumps(result))
    print(f"{mode} seed {seed}: {result['steps']} steps, {wall:.0f}s, raw {result['raw']}, ema {result['ema']}",
          flush=True)
    return result


def reused(saved: Path, suite: str) -> dict:
    """A kept result, refused when it was scored on another suite (the dev protocol and the test split must not
    mix in one --out)."""
    result = json.loads(saved.read_text())
    if result.get("suite", "covid") != suite:
        raise SystemExit(f"{saved} was scored on {result.get('suite', 'covid')}, this run scores {suite}: "
                         "use another --out")
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"


def print_main_table(start: dict, runs: dict[str, list[dict]]) -> None:
    print("\n| model | " + " | ".join(MAIN_COLUMNS.values()) + " | trainable params | peak memory (MB) | wall (s) |")
    print("|---|" + "---|" * (len(MAIN_COLUMNS) + 3))
    print("| start (shared_real export) | " + " | ".join(f"{start['raw'].get(d, float('nan')):.3f}"
                                                   for d in MAIN_COLUMNS) + " | – | – | – |")
    for mode, results in runs.items():
        for weights in ("raw", "ema"):
            cells = [mean_std([r[weights].get(d, float("nan")) for r in results]) for d in MAIN_COLUMNS]
            peak_key = next((k for k in results[0] if k.startswith("peak_")), None)
            share = results[0]["trainable_params"] / results[0]["total_params"]
            peak = mean_std([r[peak_key] for r in results]) if peak_key else "–"
            print(f"| {mode}{' + EMA' if weights == 'ema' else ''} | " + " | ".join(cells) +
                  f" | {results[0]['trainable_params']:,} ({share:.1%}) | {peak} | "
                  f"{mean_std([r['wall_s'] for r in results])} |")


def print_few_shot_table(start: dict, runs: dict[str, list[dict]]) -> None:
    for dataset in FEW_SHOT_DATASETS:
        print(f"\n{dataset} (balanced accuracy; fine-tuned rows: mean ± std over fine-tuning seeds of the "
              "probe-seed means)")
        print("| model | method | " + " | ".join(f"k={k}" for k in SHOTS) + " |")
        print("|---|---|" + "---|" * len(SHOTS))
        for method in (*PROBE_METHODS, "zero-shot"):
            key = f"{dataset}/{method}"
            print(f"| start | {method} | " + " | ".join(f"{start['few_shot'][key][str(k)][0]:.3f}" for k in SHOTS) + " |")
            for mode, results in runs.items():
                print(f"| {mode} | {method} | " +
                      " | ".join(mean_std([r["few_shot"][key][str(k)][0] for r in results]) for k in SHOTS) + " |")


def build_shards(out: Path, config: str) -> Path:
    """The fine-tuning recipes' data.build, once: a one-step run builds it; every run reuses it."""
    probe = out / "build"
    if probe.exists():
        shutil.rmtree(probe)
    srv.run_timed([str(BIN / "medclip"), "pretrain", "--config", config, "--set", f"run.output_dir={probe}",
                "--set", "run.steps=1", "--set", "eval.suites=[]", "--set", "run.progress=false",
                "--set", f"model.checkpoint={out.resolve() / 'start'}"], out / "build.log")
    return probe / "shards"


def evaluate_start(start_model: Path, args, out: Path) -> dict:
    """The starting model's suite results and few-shot table (kept in OUT/start.json for the same model)."""
    saved = out / "start.json"
    if saved.is_file() and json.loads(saved.read_text()).get("model") == str(start_model.resolve()):
        return reused(saved, args.suite)
    evaluated = out / "start-eval"
    srv.run_timed([str(BIN / "medclip"), "eval", "suite", args.suite, "--model", str(start_model), "--out", str(evaluated),
                "--force", "--no-plots", "--no-progress", "--seeds", "0"], out / "start-eval.log")
    start = {"model": str(start_model.resolve()), "suite": args.suite, "raw": headlines(evaluated),
             "few_shot": {} if args.dev else few_shot(start_model, args.suite, out / "start-fewshot", out)}
    saved.write_text(json.dumps(start))
    print(f"start: {start['raw']}", flush=True)
    return start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", type=Path, default=REPO / "runs/shared_real/export",
                        help="the starting model: a medclip export (default: the shared_real recipe's)")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--out", type=Path, help="default runs/bench_finetune_covid (--dev: ..._dev)")
    parser.add_argument("--report", action="store_true", help="print the tables of the runs finished so far")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, all modes")
    parser.add_argument("--dev", action="store_true",
                        help="train on 80%% of the train split's patients, evaluate on the other 20%% (no test split, "
                             "no few-shot): where settings are chosen")
    args = parser.parse_args(argv)
    args.out = args.out or REPO / ("runs/bench_finetune_covid_dev" if args.dev else "runs/bench_finetune_covid")
    if not (args.start / "open_clip_config.json").is_file():
        raise SystemExit(f"--start {args.start} is not a medclip export: run `medclip pretrain --config shared_real`")
    args.out.mkdir(parents=True, exist_ok=True)
    start_link = args.out / "start"
    if start_link.is_symlink() or start_link.exists():
        start_link.unlink()
    start_link.symlink_to(args.start.resolve(), target_is_directory=True)

    args.configs, args.suite = {mode: f"finetune_{mode}" for mode in MODES}, "covid"
    if args.dev:
        configs, suite = write_dev_split(args.out / "dev-split", MODES)
        args.configs, args.suite = {mode: str(path) for mode, path in configs.items()}, str(suite)
    start = evaluate_start(args.start, args, args.out)
    shards = args.out / "build" / "shards"
    if not shards.is_dir():
        shards = build_shards(args.out, args.configs["full"])
    if args.report:  # the finished runs only
        runs = {mode: [json.loads((args.out / f"{mode}-seed{seed}.json").read_text()) for seed in args.seeds
                       if (args.out / f"{mode}-seed{seed}.json").is_file()] for mode in args.modes}
        runs = {mode: results for mode, results in runs.items() if results}
    else:
        runs = {mode: [] for mode in args.modes}
        for seed in args.seeds:  # every mode of a seed before the next seed: a cut-short run still compares modes
            for mode in args.modes:
                runs[mode].append(fine_tune(args, mode, seed, shards, args.out))
    (args.out / "results.json").write_text(json.dumps({"start": start, "runs": runs}, indent=1))
    print_main_table(start, runs)
    if not args.dev:
        print_few_shot_table(start, runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
