"""`medclip concepts annotate` and `medclip explain`."""

from __future__ import annotations

import logging
from pathlib import Path

from medclip import jsonio
from medclip.errors import MedclipError
from medclip.outputs import check_output_file

log = logging.getLogger(__name__)


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _read_names(path: str) -> list[str]:
    """Concept names from a text file (one per line) or any vocabulary file (its preferred names)."""
    p = Path(path)
    if p.suffix == ".txt" and p.is_file():
        return [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    from medclip.concepts.vocab import load_vocabulary

    return sorted({c.name for c in load_vocabulary(p).concepts.values()})


def run_annotate(args) -> int:
    from medclip.concepts.annotator import AnnotatorConfig, ConceptAnnotator
    from medclip.concepts.negation import NegationConfig
    from medclip.concepts.shards import AnnotationStats, annotate_jsonl, annotate_shard
    from medclip.concepts.vocab import load_vocabularies

    negation = NegationConfig(comma_ends_scope=args.comma_ends_negation)
    if args.scispacy_model:
        from medclip.concepts.scispacy_linker import ScispacyAnnotator

        annotator = ScispacyAnnotator(args.scispacy_model, negation=None if args.no_negation else negation)
    elif args.vocab:
        vocab = load_vocabularies(args.vocab, args.vocab_format, _split(args.semantic_types) or None, args.mrsty)
        config = AnnotatorConfig(negation=not args.no_negation, min_chars=args.min_chars, negation_config=negation)
        annotator = ConceptAnnotator(vocab, config)
        log.info("vocabulary: %d concepts, %d match keys", len(vocab), annotator.n_keys)
    else:
        raise MedclipError("give --vocab FILE (or --scispacy-model NAME to use scispaCy's linker)")
    inputs = [Path(p) for p in args.inputs]
    if args.output and len(inputs) > 1:
        raise MedclipError("-o/--output takes one input; without it shards are annotated in place")
    total = AnnotationStats()
    for src in inputs:
        if src.suffix == ".jsonl":
            if not args.output and not args.in_place:
                raise MedclipError(f"{src}: give -o OUT.jsonl (or --in-place to rewrite it)")
            stats = annotate_jsonl(src, args.output or src, annotator, args.field, args.out_field)
        elif src.suffix == ".tar":
            stats = annotate_shard(src, annotator, args.output, args.out_field, args.overwrite)
        else:
            raise MedclipError(f"{src}: expected a .jsonl file or a .tar shard")
        log.info("%s: %s", src, stats.summary())
        total.add(stats)
    print(jsonio.dumps({"records": total.records, "annotated": total.annotated, "mentions": total.mentions,
                        "negated": total.negated, "skipped": total.skipped}))
    return 0


def _load_encoder(args):
    import medclip

    if not args.model:
        raise MedclipError("give --model NAME_OR_DIR")

    return medclip.load(args.model, device=args.device, checkpoint=args.checkpoint, hf_text_dir=args.hf_text_dir)


def run_explain(args) -> int:
    if args.grounding:
        from medclip.concepts.grounding import (
            baseline_grounding,
            evaluate_grounding,
            grounding_records_from_shards,
            prior_grounding,
        )

        if args.method == "prior" and not args.prior_from:
            raise MedclipError("--method prior needs --prior-from SHARDS (boxed samples to fit it on, "
                               "e.g. the training split)")
        if args.output:
            check_output_file(args.output, [*args.grounding, *(args.prior_from or [])], args.force)
        records = grounding_records_from_shards(args.grounding)
        if args.method in ("random", "centre"):
            result = baseline_grounding(records, args.method, tolerance=args.tolerance)
        elif args.method == "prior":
            result = prior_grounding(grounding_records_from_shards(args.prior_from), records,
                                     tolerance=args.tolerance)
        else:
            result = evaluate_grounding(_load_encoder(args), records, tolerance=args.tolerance,
                                        use_heads=_use_heads(args.method), stride=args.stride)
        return _print_json(result.to_dict(), args.output)
    if not args.image:
        raise MedclipError("give an IMAGE to explain (or --grounding SHARDS)")
    from medclip.concepts.explain import explain, rank_concepts

    concepts = _split(args.concepts) + (_read_names(args.concepts_file) if args.concepts_file else [])
    if not concepts:
        raise MedclipError("give --concepts 'a,b' and/or --concepts-file FILE")
    output = Path(args.output or Path(args.image).with_suffix(".concepts.png").name)
    check_output_file(output, [args.image, args.concepts_file, args.vocab], args.force)
    encoder = _load_encoder(args)
    maps = explain(encoder, args.image, concepts, stride=args.stride)
    ranked = None
    if args.vocab:
        ranked = rank_concepts(encoder, args.image, _read_names(args.vocab), args.top_k)
    maps.save_png(output, ranked or maps.ranked())
    print(jsonio.dumps({"png": str(output), "method": maps.method,
                        "concepts": [{"name": n, "score": s} for n, s in maps.ranked()],
                        **({"top_concepts": [{"name": n, "score": s} for n, s in ranked]} if ranked else {})},
                       indent=2))
    return 0


def _use_heads(method: str | None) -> bool | None:
    """--method heads | cosine | None (the model decides: heads when it has them)."""
    return None if method is None else method == "heads"


def _print_json(result: dict, output: str | None) -> int:
    text = jsonio.dumps(result, indent=2)
    if output:
        Path(output).write_text(text + "\n")
    print(text)
    return 0


def run_zero_shot(args) -> int:
    from medclip.concepts.explain import annotate_images

    concepts = _split(args.concepts) + (_read_names(args.concepts_file) if args.concepts_file else [])
    if args.output:
        check_output_file(args.output, [*args.images, *(args.shards or []), args.concepts_file], args.force)
    if args.shards:
        from medclip.concepts.zero_shot import concept_label_records_from_shards, evaluate_concept_zero_shot

        if args.images:
            raise MedclipError("give images or --shards, not both")
        records = concept_label_records_from_shards(args.shards)
        result = evaluate_concept_zero_shot(_load_encoder(args), records, concepts or None, _use_heads(args.method))
        return _print_json(result.to_dict(), args.output)
    if not args.images:
        raise MedclipError("give image files to annotate (or --shards SHARDS to score against their concept labels)")
    if not concepts:
        raise MedclipError("give --concepts 'a,b' and/or --concepts-file FILE")
    labels = annotate_images(_load_encoder(args), args.images, concepts, top_k=args.top_k, threshold=args.threshold)
    lines = [jsonio.dumps({"image": image, "concepts": row}) for image, row in zip(args.images, labels)]
    if args.output:
        Path(args.output).write_text("\n".join(lines) + "\n")
    else:
        print("\n".join(lines))
    return 0


def _model_args(parser) -> None:
    parser.add_argument("--model", help="model name, hub directory or checkpoint (required except for "
                                         "the grounding references --method random / centre / prior)")
    parser.add_argument("--checkpoint", help="weights for a model name")
    parser.add_argument("--hf-text-dir", help="local HF text tower directory (offline)")
    parser.add_argument("--device", default=None)


def register(subparsers) -> None:
    concepts = subparsers.add_parser("concepts", help="concept annotation of captions")
    sub = concepts.add_subparsers(dest="concepts_command", metavar="SUBCOMMAND")
    sub.required = True
    ann = sub.add_parser("annotate", help="find vocabulary concepts in captions (JSONL or tar shards in place)")
    ann.add_argument("inputs", nargs="+", help="INPUT.jsonl or shard .tar files (shards are rewritten atomically)")
    ann.add_argument("--vocab", action="append",
                     help="MRCONSO.RRF (or a UMLS META dir), MeSH TSV, plain TSV (id, name, syn|syn) or a "
                          "CheXpert phrase dir; repeatable")
    ann.add_argument("--vocab-format", default="auto", choices=["auto", "umls", "mesh", "tsv", "chexpert"])
    ann.add_argument("--semantic-types", help="UMLS only: keep these TUIs / type names / groups, e.g. T047,ANAT")
    ann.add_argument("--mrsty", help="UMLS only: MRSTY.RRF (default: beside MRCONSO.RRF)")
    ann.add_argument("-o", "--output", help="output file (JSONL input: required unless --in-place)")
    ann.add_argument("--in-place", action="store_true", help="rewrite a JSONL input in place")
    ann.add_argument("--field", default="caption", help="JSONL field holding the caption (or list of captions)")
    ann.add_argument("--out-field", default="concepts", help="field to write the mentions to")
    ann.add_argument("--overwrite", action="store_true", help="shards: replace concepts a sample already has")
    ann.add_argument("--no-negation", action="store_true", help="do not detect negated mentions")
    ann.add_argument("--comma-ends-negation", action="store_true", help="a comma ends a negation's scope")
    ann.add_argument("--min-chars", type=int, default=3, help="ignore synonyms shorter than this")
    ann.add_argument("--scispacy-model", help="use scispaCy's UMLS linker with this spaCy model instead of "
                                              "--vocab (optional dependency, e.g. en_core_sci_sm)")
    ann.set_defaults(func=run_annotate)

    zs = sub.add_parser("zero-shot", help="rank concepts for each image with a model (zero-shot annotation)")
    zs.add_argument("images", nargs="*", help="image files")
    _model_args(zs)
    zs.add_argument("--shards", nargs="+", metavar="SHARDS",
                    help="instead of images: score every image of these shards against its concept labels "
                         "(non-negated 'concepts' of the sample JSON) and print the AUC per concept")
    zs.add_argument("--method", choices=["heads", "cosine"],
                    help="PC-Align heads or image-text cosine of the names (default: heads when the model has them)")
    zs.add_argument("--concepts", help="comma-separated concept names")
    zs.add_argument("--concepts-file", help="concept names, one per line (or a vocabulary file)")
    zs.add_argument("--top-k", type=int, default=5)
    zs.add_argument("--threshold", type=float, help="keep scores above this (PC-Align logits: 0 = probability 0.5)")
    zs.add_argument("-o", "--output", help="JSONL output (default: stdout)")
    zs.add_argument("--force", action="store_true", help="write -o even when it is one of the inputs")
    zs.set_defaults(func=run_zero_shot)

    exp = subparsers.add_parser("explain", help="concept heatmaps of an image, or grounding scores on boxed shards")
    exp.add_argument("image", nargs="?", help="image file (JPEG/PNG/DICOM)")
    _model_args(exp)
    exp.add_argument("--concepts", help="comma-separated concept names to map")
    exp.add_argument("--concepts-file", help="concept names, one per line (or a vocabulary file)")
    exp.add_argument("--vocab", help="rank the image's top concepts from these names (file)")
    exp.add_argument("--top-k", type=int, default=10)
    exp.add_argument("-o", "--output", help="PNG (explain) or JSON (grounding) output path")
    exp.add_argument("--force", action="store_true", help="write -o even when it is one of the inputs")
    exp.add_argument("--grounding", nargs="+", metavar="SHARDS",
                     help="shards or directories whose samples carry 'boxes': print pointing game and energy")
    exp.add_argument("--stride", type=int, metavar="PIXELS",
                     help="maps every PIXELS input pixels instead of one per patch (shift-and-stitch: "
                          "(patch / PIXELS)^2 forward passes; must divide the patch)")
    exp.add_argument("--tolerance", type=float, default=0.0, help="pointing-game margin around boxes (pixels)")
    exp.add_argument("--method", choices=["heads", "cosine", "random", "centre", "prior"],
                     help="grounding: PC-Align heads, patch-text cosine, or a model-free reference (a uniformly "
                          "random point, the image centre, each concept's box prior fitted on --prior-from); "
                          "default: heads when the model has them")
    exp.add_argument("--prior-from", nargs="+", metavar="SHARDS",
                     help="boxed shards (e.g. the training split) the --method prior reference is fitted on")
    exp.set_defaults(func=run_explain)
