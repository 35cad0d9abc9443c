"""What PC-Align adds: the demo recipe with PC-Align against the same recipe without it, and ablations.

Every variant is the demo recipe (``pretrain/demo.yaml``) with a few ``--set`` overrides, trained by
the user's own command (``medclip pretrain``) once per seed with the same steps, then scored on the
held-out demo split (the demo set is built from the run's seed):

* grounding of the findings' boxes: pointing game at tolerance 0 and within one patch, energy in the
  box (``medclip explain --grounding``), from the PC-Align heads and from the patch-text cosine of the
  image-text embedding space (the IT-only baseline), plus the model-free references: a uniformly
  random point (chance, exact expectation), the image centre, and each concept's box prior (the
  coverage map of its boxes in the run's training split, the same map for every image: what a model
  that only learned where a finding usually is would score);
* concept zero-shot: AUC per concept of image-level scores against the split's concept labels
  (``medclip concepts zero-shot --shards``), heads vs the image-text embeddings of the same names;
* the demo suite the run evaluates at its end: modality accuracy, finding balanced accuracy,
  image retrieval R@5.

Splits (``--split``, one or more; docs/grounding.md): ``demo``, the shipped demo split (findings at their
usual place); ``random``, the demo set with ``data.demo_layout: random`` (a finding's position independent
of its concept); ``planted``, findings planted at random places into real X-ray, CT and MRI images of
../shared/data (``medclip data planted``; the run trains on its train side and is scored on its held-out
side; no demo suite). ``--no-model`` builds each split's data as a run would and prints only the model-free
rows (chance, centre, prior), per concept too: no training.

Rows are mean +- sample standard deviation over seeds (the table says how many); the JSON beside the
table keeps every seed. Runs are kept under ``--out`` and reused when their resolved recipe is unchanged
(``--retrain`` forces them). Each run is one ``make pretrain`` (400 steps of the demo recipe).

    .venv/bin/python bench/pc_align_value.py                        # 3 seeds, every variant
    .venv/bin/python bench/pc_align_value.py --variants pc_align it_only --seeds 0 1 2
    .venv/bin/python bench/pc_align_value.py --variants pc_align --seeds 0 --figure docs/demo_heatmap.png
    .venv/bin/python bench/pc_align_value.py --no-model --split demo random planted
    .venv/bin/python bench/pc_align_value.py --split random --variants pc_align it_only --seeds 0 \
        --findings-figure docs/grounding_findings.png
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _pc_align_figures as figures  # noqa: E402  (the README's heatmaps)
from _pc_align_tables import mean_sd, per_concept_table, print_table, table_rows  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RECIPE = "pretrain/demo.yaml"
REAL_RECIPE = "pretrain/shared_real.yaml"  # MedPix + COVID-19 from ../shared/data, PC-Align from step 200
SHARED_DATA = REPO.parent / "shared" / "data"
SPLITS = {  # name -> what it is (docs/grounding.md)
    "demo": "the shipped demo split: each finding at its usual place",
    "random": "the demo set with data.demo_layout: random: a finding's position independent of its concept",
    "planted": "findings planted at random places into real X-ray, CT and MRI images (medclip data planted)",
}

# name -> (what it shows, recipe overrides). The first two are the comparison; the rest are ablations
# of the shipped PC-Align choices, one change each.
VARIANTS = {
    "pc_align": ("the demo recipe as shipped (IT + PC-Align)", []),
    "it_only": ("the same recipe without PC-Align", ["objective.pc_weight=0"]),
    "heads_on_last_block": ("heads read the last block's tokens, as ConceptCLIP's (still trained on names)",
                            ["objective.pc_patch_states=last", "objective.pc_patch_context=1"]),
    "heads_on_block1": ("heads read the first block's tokens with their 3x3 neighbours (a patch next to its "
                        "surroundings)", ["objective.pc_patch_states=block1"]),
    "negated_negative": ("a concept the caption names negated ('no hemorrhage') is a negative of its own image, so "
                         "normal studies are scored", ["objective.pc_negated=negative"]),
    "heads_on_stem": ("heads read the patch stem without the positional embedding, with their 3x3 neighbours (what "
                      "a patch shows, not where it is)", ["objective.pc_patch_states=stem"]),
    "conv_head": ("the patch head as two convolutions over the grid (3x3, then 3x3 and 1x1; two non-linearities)",
                  ["objective.pc_patch_head=conv"]),
    "patch_alone": ("heads read each patch embedding without its 3x3 neighbours", ["objective.pc_patch_context=1"]),
    "no_concept_names": ("heads trained on caption spans only (queried with names)",
                         ["objective.use_concept_names=false"]),
    "same_cui_negative": ("ConceptCLIP's rule: same-CUI concepts of other captions are negatives",
                          ["objective.pc_same_concept=negative"]),
    "pool_topk": ("mean of the top-4 patches instead of the max", ["objective.pc_pool=topk", "objective.pc_topk=4"]),
    "pool_lse": ("smooth maximum (log-sum-exp, tau 0.1) instead of the max", ["objective.pc_pool=lse"]),
    "patch_negatives": ("also every patch of an image without the concept as its negative (weight 1)",
                        ["objective.pc_patch_negatives=1.0"]),
}
# The same question on real data (``--real``): the shared_real recipe with and without its PC-Align stage,
# scored by the run's own evaluation (MedPix dev and COVID-19 test: zero-shot, retrieval, linear probes).
REAL_VARIANTS = {
    "shared_real": ("the shared_real recipe as shipped (IT-Align, then IT + PC-Align from step 200)", []),
    "shared_real_it_only": ("the same recipe without its PC-Align stage", ["objective.pc_weight=0"]),
}
SUITE_METRICS = {"modality_acc": ("demo_modality", "acc1"), "finding_bacc": ("demo_finding", "mean_per_class_recall"),
                 "image_r5": ("demo_retrieval", "image_retrieval_recall@5")}


def overrides(variant_sets: list[str], seed: int, run_dir: Path, steps: int | None) -> list[str]:
    sets = [f"run.output_dir={run_dir}", f"run.seed={seed}", "run.progress=false", "run.tensorboard=false",
            *variant_sets]
    return sets + ([f"run.steps={steps}"] if steps else [])


def train(recipe: str, variant_sets: list[str], seed: int, run_dir: Path, steps: int | None, retrain: bool,
          report_only: bool = False) -> dict | None:
    """Train one run with ``medclip pretrain`` unless a finished run with the same recipe is there
    (``report_only``: never train; None when the run is not there)."""
    sets = overrides(variant_sets, seed, run_dir, steps)
    resolved = subprocess.run([str(BIN / "medclip"), "pretrain", "--config", recipe, "--print-recipe",
                               *(a for s in sets for a in ("--set", s))],
                              cwd=REPO, check=True, capture_output=True, text=True).stdout
    marker = run_dir / "bench-recipe.yaml"
    done = (run_dir / "export").is_dir() and marker.is_file() and marker.read_text() == resolved
    if done and not retrain:
        print(f"  reusing {run_dir}", flush=True)
        return json.loads((run_dir / "bench-run.json").read_text())
    if report_only:
        print(f"  not there (or not finished): {run_dir}; left out", flush=True)
        return None
    if run_dir.exists():
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.mkdir(parents=True)
    cmd = [str(BIN / "medclip"), "pretrain", "--config", recipe, *(a for s in sets for a in ("--set", s))]
    print("  " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"training failed ({proc.returncode}); see {run_dir.parent / (run_dir.name + '.log')}")
    info = {"seconds": time.perf_counter() - start, "command": cmd}
    (run_dir / "bench-run.json").write_text(json.dumps(info))
    marker.write_text(resolved)
    return info


def final_results(run_dir: Path) -> dict[str, dict]:
    """{dataset: result record} of a run's own final evaluation."""
    from medclip.evaluation.report import read_results

    steps = sorted(run_dir.glob("eval/step_*"), key=lambda p: int(p.name.split("_")[1]))
    if not steps:
        raise SystemExit(f"{run_dir}: the run wrote no evaluation (the recipe's eval.suites)")
    return {r["dataset"]: r for r in read_results(steps[-1])}


def suite_metrics(run_dir: Path) -> dict:
    """The demo suite's final results of a run."""
    by_dataset = final_results(run_dir)
    return {key: by_dataset[dataset]["metrics"][metric] for key, (dataset, metric) in SUITE_METRICS.items()}


def split_shards(split: str, data_dir: Path) -> tuple[list[Path], list[Path]]:
    """(training shards, held-out shards) of a split's data folder (a run's demo_data, or a planted build)."""
    prefix = "planted" if split == "planted" else "demo"
    shards = tuple(sorted(data_dir.glob(f"{prefix}-{side}-*.tar")) for side in ("train", "val"))
    if not all(shards):
        raise SystemExit(f"{data_dir}: no {prefix}-train/{prefix}-val shards")
    return shards


def planted_data(out: Path, seed: int, data_root: Path) -> Path:
    """The planted split of a seed, built once with the user's command (``medclip data planted``)."""
    folder = out / "planted" / "data" / f"seed_{seed}"
    if not (folder / "planted-val.yaml").is_file():
        subprocess.run([str(BIN / "medclip"), "data", "planted", "--out", str(folder), "--root", str(data_root),
                        "--seed", str(seed)], cwd=REPO, check=True)
    return folder


def split_sets(split: str, seed: int, out: Path, data_root: Path) -> list[str]:
    """Recipe overrides that train the demo recipe on a split."""
    if split == "random":
        return ["data.demo_layout=random"]
    if split == "planted":
        manifest = planted_data(out, seed, data_root) / "planted-train.yaml"
        return ["data.demo=false", f"data.sources=[{{manifest: {manifest}}}]", "eval.suites=[]"]
    return []


def run_data_dir(split: str, run_dir: Path, out: Path, seed: int, data_root: Path) -> Path:
    return planted_data(out, seed, data_root) if split == "planted" else run_dir / "demo_data"


def reference_scores(train_shards: list[Path], val_shards: list[Path], grid: int) -> dict:
    """The model-free rows: chance (a uniformly random point), the image centre and each concept's box prior
    fitted on the training shards; pointing game at tolerance 0 and one patch (of a ``grid`` x ``grid`` model
    on the stored image), energy, per concept."""
    from medclip.concepts.grounding import baseline_grounding, grounding_records_from_shards, prior_grounding

    boxes = grounding_records_from_shards(val_shards)
    patch = boxes[0].image.size[0] / grid
    train_boxes = grounding_records_from_shards(train_shards)
    out = {}
    for kind in ("random", "centre"):
        tol0, tol1 = baseline_grounding(boxes, kind, 0.0), baseline_grounding(boxes, kind, patch)
        out[kind] = {"pg0": tol0.pointing_accuracy, "pg1": tol1.pointing_accuracy, "energy": tol0.mean_energy,
                     "per_concept_pg0": {k: v["pointing_accuracy"] for k, v in tol0.per_concept.items()}}
    prior0, tol1 = prior_grounding(train_boxes, boxes, 0.0), prior_grounding(train_boxes, boxes, patch)
    prior_missed = [_box_id(r) for r in prior0.per_record if not r["hit"]]
    out["prior"] = {"pg0": prior0.pointing_accuracy, "pg1": tol1.pointing_accuracy, "energy": prior0.mean_energy,
                    "pg0_prior_missed": 0.0, "n_prior_missed": len(prior_missed), "prior_missed": prior_missed,
                    "n_boxes": prior0.n,
                    "per_concept_pg0": {k: v["pointing_accuracy"] for k, v in prior0.per_concept.items()},
                    "per_concept_n": {k: v["n"] for k, v in prior0.per_concept.items()}}
    return out


def score_run(run_dir: Path, methods: list[str], train_shards: list[Path], val_shards: list[Path],
              stride: int | None = None) -> dict:
    """{method: {pg0, pg1, energy, concept_auc}} for a trained run on its held-out split (maps every ``stride``
    input pixels, default one per patch), and the references."""
    import medclip
    from medclip.concepts.grounding import evaluate_grounding, grounding_records_from_shards
    from medclip.concepts.zero_shot import concept_label_records_from_shards, evaluate_concept_zero_shot

    boxes = grounding_records_from_shards(val_shards)
    labels = concept_label_records_from_shards(val_shards)
    encoder = medclip.load(str(run_dir / "export"), device="cpu")
    patch = boxes[0].image.size[0] / encoder.grid_size[1]  # one patch in the stored image's pixels
    out = reference_scores(train_shards, val_shards, encoder.grid_size[1])
    prior_missed = {tuple(b) for b in out["prior"].pop("prior_missed")}
    for method in methods:
        use_heads = method == "heads"
        tol0 = evaluate_grounding(encoder, boxes, 0.0, use_heads, stride)
        tol1 = evaluate_grounding(encoder, boxes, patch, use_heads, stride)
        auc = evaluate_concept_zero_shot(encoder, labels, use_heads=use_heads)
        beyond = [r["hit"] for r in tol0.per_record if _box_id(r) in prior_missed]
        out[method] = {"pg0": tol0.pointing_accuracy, "pg1": tol1.pointing_accuracy, "energy": tol0.mean_energy,
                       "pg0_prior_missed": sum(beyond) / len(beyond) if beyond else None, "n_prior_missed": len(beyond),
                       "concept_auc": auc.mean_auc, "n_boxes": tol0.n,
                       "per_concept_pg0": {k: v["pointing_accuracy"] for k, v in tol0.per_concept.items()},
                       "per_concept_auc": {k: v["auc"] for k, v in auc.per_concept.items()}}
    return out


def _box_id(record: dict) -> tuple:
    return record["key"], record["concept"], *record["box"]


def cached_scores(run_dir: Path, split: str, data_dir: Path, stride: int | None = None) -> dict:
    """score_run's result for a finished run, kept beside it (a retrained run starts from an empty folder)."""
    path = run_dir / ("bench-scores.json" if stride is None else f"bench-scores-stride{stride}.json")
    if path.is_file() and "per_concept_n" in (scores := json.loads(path.read_text())).get("prior", {}):
        return scores
    with_heads = yaml.safe_load((run_dir / "bench-recipe.yaml").read_text())["objective"]["pc_weight"] > 0
    scores = score_run(run_dir, ["heads", "cosine"] if with_heads else ["cosine"], *split_shards(split, data_dir),
                       stride)
    path.write_text(json.dumps(scores))
    return scores


def run_split(args, out: Path, split: str) -> None:
    """Train (or reuse) every variant on one split for every seed, score them, print and keep the table."""
    base = out if split == "demo" else out / split  # the demo split's runs stay where earlier tables found them
    results: dict = {}
    for variant in args.variants:
        results[variant] = {}
        for seed in args.seeds:
            print(f"{split} / {variant} seed {seed}: {VARIANTS[variant][0]}", flush=True)
            run_dir = base / variant / f"seed_{seed}"
            sets = VARIANTS[variant][1] + split_sets(split, seed, out, args.data_root)
            info = train(RECIPE, sets, seed, run_dir, args.steps, args.retrain, args.report_only)
            if info is None:
                continue
            data_dir = run_data_dir(split, run_dir, out, seed, args.data_root)
            results[variant][seed] = {"seconds": info["seconds"],
                                      "suite": {} if split == "planted" else suite_metrics(run_dir),
                                      "scores": cached_scores(run_dir, split, data_dir, args.stride)}
    refs = [r["scores"] for r in next((v for v in results.values() if v), {}).values()]
    if not refs:
        raise SystemExit(f"{split}: no finished run to tabulate")
    maps = "one map cell per patch" if args.stride is None else f"maps every {args.stride} px (shift-and-stitch)"
    table = print_table(table_rows(refs, results, args.variants), f"{split}: {SPLITS[split]}; {maps}")
    table += "\n\n" + per_concept_table(refs, results)
    suffix = "" if args.stride is None else f"-stride{args.stride}"
    (base / f"results{suffix}.json").write_text(json.dumps(results, indent=1))
    (base / f"table{suffix}.md").write_text(table + "\n")
    print(f"results: {base / f'results{suffix}.json'}")
    if args.figure and split == "demo":
        figures.render_figure(out / "pc_align" / f"seed_{args.seeds[0]}", args.figure.resolve())
    if args.findings_figure and split == "random":
        figures.render_findings_figure(base / "pc_align" / f"seed_{args.seeds[0]}", args.findings_figure.resolve(),
                                       args.stride)


def reference_data(split: str, seed: int, out: Path, data_root: Path) -> Path:
    """A split's data for a seed without training: built as the run would build it (the demo recipe's sizes)."""
    if split == "planted":
        return planted_data(out, seed, data_root)
    from medclip.models.registry import get_model_config
    from medclip.training.components import demo_dir, prepare_demo
    from medclip.training.config import load_recipe

    recipe = load_recipe(RECIPE, [f"run.seed={seed}", *split_sets(split, seed, out, data_root)])
    folder = out / split / "data" / f"seed_{seed}"
    prepare_demo(recipe, get_model_config(recipe.model.name), folder, is_main=True)
    return demo_dir(folder)


def run_references(args, out: Path, split: str) -> None:
    """``--no-model``: chance, centre and the concept prior of a split for each seed (tolerance 1 = one patch of
    the demo recipe's model on the stored image)."""
    from medclip.models.registry import get_model_config
    from medclip.training.config import load_recipe

    vision = get_model_config(load_recipe(RECIPE).model.name)["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]
    refs = []
    for seed in args.seeds:
        train_shards, val_shards = split_shards(split, reference_data(split, seed, out, args.data_root))
        refs.append(reference_scores(train_shards, val_shards, grid))
        print(f"{split} seed {seed}: {refs[-1]['prior']['n_boxes']} held-out boxes", flush=True)
    table = print_table(table_rows(refs, {}, []), f"{split}: {SPLITS[split]} (no model; seeds "
                                                  f"{', '.join(map(str, args.seeds))})")
    table += "\n\n" + per_concept_table(refs, {})
    (out / split).mkdir(parents=True, exist_ok=True)
    (out / split / "references.json").write_text(json.dumps(refs, indent=1))
    (out / split / "references.md").write_text(table + "\n")


def run_real(args, out: Path) -> None:
    """shared_real with and without PC-Align: every headline metric of its evaluation, per seed and mean."""
    results: dict = {}
    for variant, (what, sets) in REAL_VARIANTS.items():
        results[variant] = {}
        for seed in args.seeds:
            print(f"{variant} seed {seed}: {what}", flush=True)
            run_dir = out / variant / f"seed_{seed}"
            info = train(REAL_RECIPE, sets, seed, run_dir, args.steps, args.retrain, args.report_only)
            if info is None:
                continue
            records = final_results(run_dir)
            results[variant][seed] = {"seconds": info["seconds"],
                                      "headline": {name: (r["headline_metric"], r["headline"])
                                                   for name, r in sorted(records.items())}}
    seeds = [seed for seed in args.seeds if all(seed in results[v] for v in REAL_VARIANTS)]
    if not seeds:
        raise SystemExit("no seed has both shared_real runs finished")
    names = list(results["shared_real"][seeds[0]]["headline"])
    lines = ["| dataset [headline] | " + " | ".join(REAL_VARIANTS) + " | difference |", "|---|---|---|---|"]
    for name in names:
        metric = results["shared_real"][seeds[0]]["headline"][name][0]
        per = {v: [results[v][seed]["headline"][name][1] for seed in seeds] for v in REAL_VARIANTS}
        diff = [a - b for a, b in zip(per["shared_real"], per["shared_real_it_only"])]
        lines.append(f"| {name} [{metric}] | " + " | ".join(mean_sd(per[v]) for v in REAL_VARIANTS)
                     + f" | {mean_sd(diff)} |")
    table = "\n".join(lines)
    print(table)
    (out / "results_real.json").write_text(json.dumps(results, indent=1))
    (out / "table_real.md").write_text(table + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/pc_align_value")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--steps", type=int, help="override the recipe's steps (exploration only)")
    parser.add_argument("--retrain", action="store_true", help="train again even when a finished run is there")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the finished runs under --out (e.g. while others still train)")
    parser.add_argument("--figure", type=Path, help="also render the README heatmap from pc_align, first seed")
    parser.add_argument("--findings-figure", type=Path,
                        help="also render one held-out image per finding from pc_align on --split random, first seed")
    parser.add_argument("--split", nargs="+", default=["demo"], choices=list(SPLITS),
                        help="the grounding split(s) to train and score on (module docstring)")
    parser.add_argument("--no-model", action="store_true",
                        help="train nothing: build each split's data and print chance, centre and the concept prior")
    parser.add_argument("--stride", type=int, metavar="PIXELS",
                        help="score heads and cosine maps sampled every PIXELS input pixels (medclip explain "
                             "--stride; default one per patch)")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA, help="../shared/data, for --split planted")
    parser.add_argument("--real", action="store_true",
                        help="instead: shared_real with and without its PC-Align stage (~10 min per run)")
    args = parser.parse_args(argv)
    if args.findings_figure and ("random" not in args.split or "pc_align" not in args.variants or args.no_model
                                 or args.real):
        parser.error("--findings-figure draws the pc_align runs of --split random: add both")
    if args.stride is not None:  # checked before any run trains, not when the first one is scored
        from medclip.models.registry import get_model_config
        from medclip.training.config import load_recipe

        patch = get_model_config(load_recipe(RECIPE).model.name)["vision_cfg"]["patch_size"]
        if args.stride < 1 or patch % args.stride:
            parser.error(f"--stride must divide the demo model's {patch}-pixel patch, got {args.stride}")
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.real:
        run_real(args, out)
        return 0
    for split in args.split:
        (run_references if args.no_model else run_split)(args, out, split)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
