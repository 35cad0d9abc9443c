"""`medclip eval zero-shot|retrieval|linear-probe|suite`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from medclip.errors import MedclipError

# The evaluation modules (torch) are imported inside the functions: `medclip eval --help` stays fast.

log = logging.getLogger(__name__)

TASK_OF_COMMAND = {"zero-shot": "zero-shot", "retrieval": "retrieval", "linear-probe": "linear-probe"}


def _common(p) -> None:
    p.add_argument("--model", action="append", required=True,
                   help="repeatable, one table across models: NAME=PATH for a named pretrained model and its "
                        "downloaded checkpoint (e.g. biomedclip=DIR, unimed-clip-b16=FILE.pt; see medclip info), "
                        "a medclip or open_clip name, an export directory, local-dir:DIR or a checkpoint")
    p.add_argument("--out", default="eval_results",
                   help="output directory (JSON per dataset, summary, plots): new, empty or an earlier eval output, "
                        "and not inside the data")
    p.add_argument("--force", action="store_true",
                   help="write into --out even when it is not empty or overlaps the data")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="image preprocessing worker processes")
    p.add_argument("--no-draft", action="store_true",
                   help="decode JPEGs at full size (default: reduced-scale decode when >= 2x the model input)")
    p.add_argument("--cache-dir", default=None, help="linear-probe feature cache (default ~/.cache/medclip/features)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--shots", type=int, nargs="*", default=[], help="linear probe: k per class settings")
    p.add_argument("--fractions", type=float, nargs="*", default=[1.0],
                   help="linear probe: fractions of the training set (e.g. 0.01 0.1 1)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--probe-method", default=None,
                   help="linear probe: sklearn (default; scikit-learn logistic regression with a C search), "
                        "clip_benchmark (CLIP_benchmark's AdamW linear layer with its weight-decay search) or "
                        "tip-adapter (training-free cache of the shots on the zero-shot classifier; needs the "
                        "classes' prompts); overrides a suite dataset's `method`")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (they are drawn only when stderr is a terminal)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="zero-shot, retrieval and linear-probe evaluation")
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK")
    sub.required = True
    suite = sub.add_parser("suite", help="run a benchmark suite (zero_shot/NAME.yaml or a YAML path)")
    suite.add_argument("suite")
    suite.add_argument("--root", default=None, help="data root (overrides the suite's)")
    suite.add_argument("--datasets", nargs="*", default=None, help="only these datasets of the suite")
    _common(suite)
    suite.set_defaults(func=run)
    for command in TASK_OF_COMMAND:
        p = sub.add_parser(command, help=f"{command} on one dataset (from a suite or given inline)")
        p.add_argument("--suite", default=None, help="take the dataset definition from this suite")
        p.add_argument("--dataset", default=None, help="dataset name (in the suite, or the result name)")
        p.add_argument("--root", default=None, help="data root")
        p.add_argument("--reader", default=None, help="inline: reader (image_folder, csv, jsonl, wds)")
        p.add_argument("--data", default=None, help="inline: path for the reader (file, folder or shard glob)")
        p.add_argument("--train-data", default=None, help="inline linear-probe: training split path")
        p.add_argument("--label", default=None, help="inline: label field")
        p.add_argument("--classes", nargs="*", default=None, help="inline: class labels")
        p.add_argument("--template", action="append", default=None, help="inline: prompt template with {c}")
        p.add_argument("--headline", default="", help="inline: headline metric")
        _common(p)
        p.set_defaults(func=run)


def _inline_spec(args, task: str):
    from medclip.evaluation.suites import DatasetSpec, Source, parse_classes

    if not args.reader or not args.data:
        raise MedclipError("give --suite and --dataset, or --reader and --data")
    classes = None
    if args.classes:
        templates = args.template or ["a medical image of {c}."]
        classes = parse_classes(args.classes, templates, "command line")
    label = args.label or ("label" if args.reader == "image_folder" else None)
    train = Source(args.reader, {"path": args.train_data}) if args.train_data else None
    return DatasetSpec(name=args.dataset or Path(args.data).stem, task=task, source=Source(args.reader,
                       {"path": args.data}), label=label, classes=classes, headline=args.headline, train=train)


def _plan(args) -> tuple[str, Path | None, list]:
    from medclip.evaluation.suites import load_suite

    if args.eval_command == "suite":
        suite = load_suite(args.suite)
        root = Path(args.root).resolve() if args.root else suite.root
        return suite.name, root, suite.select(args.datasets)
    task = TASK_OF_COMMAND[args.eval_command]
    if args.suite:
        if not args.dataset:
            raise MedclipError("--suite needs --dataset")
        suite = load_suite(args.suite)
        spec = suite.select([args.dataset])[0]
        if spec.task != task and not (task == "zero-shot" and spec.task == "multilabel"):
            raise MedclipError(f"dataset {spec.name} is a {spec.task} task, not {task}")
        return suite.name, Path(args.root).resolve() if args.root else suite.root, [spec]
    root = Path(args.root).resolve() if args.root else Path.cwd()
    return "", root, [_inline_spec(args, task)]


def _data_paths(specs, root: Path | None) -> list[Path]:
    """Files and folders the datasets are read from (a shard glob's fixed folder): eval must not write there."""
    paths = []
    for spec in specs:
        for source in (spec.source, spec.train, spec.val):
            for key in ("path", "image_root"):
                value = source.args.get(key) if source is not None else None
                if value:
                    path = _fixed_part(str(value))
                    paths.append(path if path.is_absolute() or root is None else root / path)
    return paths


def _fixed_part(pattern: str) -> Path:
    """The folder a shard glob or brace pattern reads from (the path itself when it has no pattern)."""
    cut = min((pattern.index(c) for c in "*?[{" if c in pattern), default=None)
    if cut is None:
        return Path(pattern)
    return Path(pattern[:cut]) if pattern[:cut].endswith("/") else Path(pattern[:cut]).parent


def _check_counts(args) -> None:
    if args.batch_size < 1:
        raise MedclipError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise MedclipError(f"--workers must be 0 (preprocess in this process) or more, got {args.workers}")


def run(args) -> int:
    from tqdm import tqdm

    from medclip.evaluation.linear_probe import FeatureCache, ProbeConfig
    from medclip.evaluation.model import EmbedOptions, resolve_model
    from medclip.evaluation.report import write_plots, write_result, write_summary
    from medclip.evaluation.runner import RunOptions, evaluate_dataset
    from medclip.outputs import claim_output_dir

    _check_counts(args)
    suite_name, root, specs = _plan(args)
    # Bars only on a terminal: in a file or a CI log each redraw would be another carriage-returned
    # fragment; the result lines below say what was done.
    progress = not args.no_progress and sys.stderr.isatty()
    options = RunOptions(
        embed=EmbedOptions(args.batch_size, args.workers, progress=progress, draft=not args.no_draft),
        probe=ProbeConfig(method=args.probe_method or "sklearn", shots=tuple(args.shots),
                          fractions=tuple(args.fractions), seeds=tuple(args.seeds), sgd_device=args.device or "cpu"),
        cache=FeatureCache(args.cache_dir),
        probe_method_given=args.probe_method is not None,
    )
    out = claim_output_dir(args.out, "eval", _data_paths(specs, root), args.force)
    for name in args.model:
        model = resolve_model(name, device=args.device, precision=args.precision)
        for spec in tqdm(specs, desc=f"{model.name}", disable=not progress):
            record = evaluate_dataset(model, spec, root, options, suite_name)
            path = write_result(record, out)
            value = record["headline"]
            shown = "n/a" if value is None else f"{value:.4f}"
            print(f"{model.name}  {spec.name}  {spec.headline}={shown}  (n={record['n_samples']}, "
                  f"skipped={record['n_skipped']})  -> {path}")
    md, csv_path = write_summary(out)
    print(f"summary: {md} {csv_path}")
    if not args.no_plots:
        plots = write_plots(out)
        print(f"plots: {len(plots)} PNG files in {out / 'plots'}")
    return 0
