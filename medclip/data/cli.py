"""CLI: ``medclip shards build|merge`` and ``medclip data check|leakage`` (and ``medclip data demo|planted``)."""

from __future__ import annotations

import argparse

from medclip.errors import MedclipError


def register(subparsers) -> None:
    shards = subparsers.add_parser("shards", help="build WebDataset tar shards")
    shards_sub = shards.add_subparsers(dest="shards_command", metavar="ACTION")
    shards_sub.required = True
    b = shards_sub.add_parser("build", help="build shards from JSONL/CSV, a class folder, or MedConcept-23M JSONL")
    b.add_argument("input", help="JSONL/CSV file, or a folder with one subfolder per class (--format folder)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--format", choices=("table", "folder", "medconcept"), default="table")
    b.add_argument("--prefix", default="shard", help="shard name prefix (PREFIX-000000.tar)")
    b.add_argument("--image-field", default="image")
    b.add_argument("--caption-field", action="append", dest="caption_fields",
                   help="caption field(s) (repeatable; default: caption)")
    b.add_argument("--caption-separator", default=None, help="split a caption field into several captions")
    b.add_argument("--label-field", action="append", dest="label_fields",
                   help="fields kept as labels (default: every other scalar field)")
    b.add_argument("--concept-field", default="concepts")
    b.add_argument("--templates", help="--format folder: caption templates (text lines with {}, JSON or YAML)")
    b.add_argument("--modality", default="", help="modality of every sample (folder input)")
    b.add_argument("--source", default="", help="source name stored in each sample")
    b.add_argument("--licence", default="", help="licence stored in each sample (unless the row has one)")
    b.add_argument("--max-samples", type=int, default=10_000, help="samples per shard")
    b.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard")
    b.add_argument("--max-side", type=int, default=None, help="shrink images whose longer side is larger")
    b.add_argument("--image-format", choices=("jpg", "png"), default="jpg")
    b.add_argument("--processes", type=int, default=1)
    b.add_argument("--part", default="0/1", help="build part i of n (e.g. one per node of a job array)")
    b.add_argument("--window", default=None, help="DICOM window CENTER,WIDTH (default: the file's own)")
    b.add_argument("--seed", type=int, default=0, help="seed of the sample order: each part's rows are permuted "
                                                      "before they are dealt into shards")
    b.add_argument("--no-shuffle", action="store_true",
                   help="write the samples in input order (a table sorted by label gives one-label shards)")
    b.add_argument("--min-shards", type=int, default=8,
                   help="shuffled builds: split a small input into this many shards (of 64+ samples each)")
    b.set_defaults(func=run_build)
    g = shards_sub.add_parser("merge", help="join the summaries of a --part i/n build into one summary + manifest")
    g.add_argument("out", help="the folder all parts were built into")
    g.add_argument("--prefix", default="shard", help="the --prefix the parts were built with")
    g.add_argument("--name", default=None, help="manifest name (default: the prefix)")
    g.add_argument("--weight", type=float, default=1.0, help="sampling weight written to the manifest")
    g.add_argument("--modality", default="")
    g.add_argument("--licence", default="")
    g.set_defaults(func=run_merge)

    data = subparsers.add_parser("data", help="dataset manifests and the demo set")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    c = data_sub.add_parser("check", help="read a manifest's shards to their end: existence, integrity, counts, "
                                          "checksums; list the shell commands it would run; warn about shards "
                                          "whose samples run in long same-label blocks")
    c.add_argument("manifests", nargs="+")
    c.add_argument("--root", default=None, help="data root substituted for {root} in URLs")
    c.add_argument("--no-checksums", action="store_true")
    c.add_argument("--allow-pipe", action="store_true", help="run the manifests' pipe: commands to read their shards")
    c.set_defaults(func=run_check)
    lk = data_sub.add_parser("leakage", help="find training images that are exact or near copies of evaluation "
                                              "images (perceptual hashes); exit 1 when any is found")
    lk.add_argument("train", nargs="+", help="training side: manifest name or path, shard glob, folder, "
                                              "JSONL/CSV table")
    lk.add_argument("--against", nargs="+", required=True,
                    help="evaluation side: suite name or YAML (the split each dataset is scored on), folder, "
                         "JSONL/CSV table, shard glob or manifest")
    lk.add_argument("--root", default=None, help="data root of the suites and manifests")
    lk.add_argument("--max-distance", type=int, default=None,
                    help="near copy: at most this many differing bits of the 64-bit pHash (default 8)")
    lk.add_argument("--workers", type=int, default=1, help="hashing processes (0: in this process)")
    lk.add_argument("--allow-pipe", action="store_true", help="run the manifests' pipe: commands to read their shards")
    lk.add_argument("--no-progress", action="store_true",
                    help="no progress bars (they are drawn only when stderr is a terminal)")
    lk.set_defaults(func=run_leakage)
    d = data_sub.add_parser("demo", help="generate the synthetic demo set")
    d.add_argument("--out", required=True)
    d.add_argument("--n-train", type=int, default=1800)
    d.add_argument("--n-val", type=int, default=300)
    d.add_argument("--image-size", type=int, default=96)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--layout", choices=("anatomical", "random"), default="anatomical",
                   help="where findings sit: their usual place, or a position independent of the finding")
    d.set_defaults(func=run_demo)
    p = data_sub.add_parser("planted", help="plant lesion-like findings of known shape and place into real X-ray, "
                                            "CT and MRI images (a grounding split on real anatomy)")
    p.add_argument("--out", required=True)
    p.add_argument("--root", default="../shared/data", help="the data root holding covid-cxr/ and medpix/")
    p.add_argument("--n-train", type=int, default=None, help="training images (default: all of the train tables)")
    p.add_argument("--n-val", type=int, default=None, help="held-out images (default: all of the test/dev tables)")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--max-findings", type=int, default=2, help="findings per image: 1 to this many (at most 5)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_planted)


def _window(text: str | None) -> tuple[float, float] | None:
    if not text:
        return None
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise MedclipError(f"--window must be CENTER,WIDTH, got {text!r}") from exc
    return center, width


def run_build(args: argparse.Namespace) -> int:
    from medclip.data import builder
    from medclip.data.build_output import listing

    cfg = builder.BuildConfig(
        out_dir=args.out, prefix=args.prefix, max_samples=args.max_samples, max_bytes=int(args.max_bytes),
        max_side=args.max_side, image_format=args.image_format, processes=args.processes,
        part=builder.parse_part(args.part), window=_window(args.window),
        shuffle_seed=None if args.no_shuffle else args.seed, min_shards=args.min_shards,
    )
    if args.format == "folder":
        if not args.templates:
            raise MedclipError("--format folder needs --templates")
        records = builder.read_class_folder(args.input, builder.load_templates(args.templates),
                                            modality=args.modality, source=args.source, licence=args.licence)
    elif args.format == "medconcept":
        records = builder.read_medconcept(args.input, source=args.source or "MedConcept-23M", licence=args.licence)
    else:
        records = builder.read_table(
            args.input, image_field=args.image_field, caption_fields=args.caption_fields or ["caption"],
            caption_separator=args.caption_separator, label_fields=args.label_fields,
            concept_field=args.concept_field, licence=args.licence, source=args.source)
    report = builder.build_shards(records, cfg)
    print(f"wrote {report.samples} samples in {len(report.shards)} shards to {report.out_dir}")
    print(f"summary: {report.summary_path}")
    if cfg.part[1] == 1:  # a whole build: its manifest now (the parts of an i/n build get one from merge)
        print(f"manifest: {builder.write_prefix_manifest(report, args.prefix)}  (a recipe's data.sources take it)")
    if report.removed:
        print(f"replaced an earlier build: removed {listing(report.removed)}")
    for kind, count in sorted(report.skipped.items()):
        print(f"skipped {count}: {kind}")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from medclip.data.builder import merge_parts

    report = merge_parts(args.out, args.prefix, name=args.name, weight=args.weight, modality=args.modality,
                         licence=args.licence)
    print(f"merged {len(report.shards)} shards, {report.samples} samples: {report.summary_path}")
    print(f"manifest: {report.out_dir / (args.prefix + '.yaml')}  (check it with: medclip data check)")
    for kind, count in sorted(report.skipped.items()):
        print(f"skipped {count}: {kind}")
    return 0


def run_check(args: argparse.Namespace) -> int:
    from medclip.data.manifest import check_manifest, command_patterns, load_manifest

    failed = False
    for path in args.manifests:
        manifest = load_manifest(path, args.root)
        for pattern, count in command_patterns(manifest):
            print(f"RUNS {manifest.name}: {count} shell command(s): {pattern[5:]}")
        warnings: list[str] = []
        problems = check_manifest(manifest, verify_checksums=not args.no_checksums, allow_pipe=args.allow_pipe,
                                  warnings=warnings)
        for w in warnings:  # readable shards, in an order that hurts training: reported, not failed
            print(f"WARN {w}")
        if problems:
            failed = True
            for p in problems:
                print(f"FAIL {p}")
        else:
            counts = f"{manifest.samples} samples" if manifest.samples is not None else "no sample count stated"
            print(f"OK   {manifest.name}: {len(manifest.urls)} shards read to their end, {counts}")
    return 1 if failed else 0


def run_leakage(args: argparse.Namespace) -> int:
    import sys

    from medclip.data.leakage import DEFAULT_MAX_DISTANCE, check_leakage
    from medclip.data.leakage_sources import open_side

    train = [open_side(s, args.root, args.allow_pipe) for s in args.train]
    against = [open_side(s, args.root, args.allow_pipe) for s in args.against]
    report = check_leakage(train, against, DEFAULT_MAX_DISTANCE if args.max_distance is None else args.max_distance,
                           workers=args.workers, progress=not args.no_progress and sys.stderr.isatty(),
                           on_finding=lambda f: print(f.line(), flush=True))
    print(report.summary())
    return 1 if report.findings else 0


def run_demo(args: argparse.Namespace) -> int:
    from medclip.data.demo import build_demo

    path = build_demo(args.out, n_train=args.n_train, n_val=args.n_val, seed=args.seed, image_size=args.image_size,
                      layout=args.layout)
    print(f"demo set written; train manifest: {path}")
    return 0


def run_planted(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medclip.data.planted import PlantedConfig, build_planted

    reports = build_planted(args.out, PlantedConfig(Path(args.root), image_size=args.image_size, seed=args.seed,
                                                    n_train=args.n_train, n_val=args.n_val,
                                                    max_findings=args.max_findings))
    for split, report in reports.items():
        skips = "".join(f"; skipped {count}: {kind}" for kind, count in sorted(report.skipped.items()))
        print(f"planted-{split}: {report.samples} samples in {len(report.shards)} shards{skips}")
    print(f"train manifest: {Path(args.out) / 'planted-train.yaml'}")
    return 0
