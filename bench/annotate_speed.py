"""Concept annotation speed: captions/s of medclip's Aho-Corasick annotator vs a plain regex, same run.

Data: the MedPix captions (train + dev) of ../shared/data with the full MeSH anatomy + disease
vocabulary (vocab/mesh_anatomy_disease.tsv). The regex baseline is the usual way to do this in
Python: one compiled alternation of every normalised synonym (and plural variant), longest first,
with word boundaries, case-insensitive, then a dict lookup of each match; it finds the same keys but
does no negation. Single process, so the figure is per core. Goal: >= 20,000 captions/s per core.

    .venv/bin/python bench/annotate_speed.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MEDCLIP_SHARED_DATA", REPO.parent / "shared" / "data"))
GOAL = 20_000


def read_captions() -> list[str]:
    captions = []
    for split in ("train", "dev"):
        path = SHARED / "medpix" / f"{split}.jsonl"
        if not path.is_file():
            sys.exit(f"missing {path}: the bench reads ../shared/data in place")
        captions += [json.loads(line)["caption"] for line in path.read_text().splitlines() if line.strip()]
    return captions


class RegexAnnotator:
    """Baseline: one big alternation regex over all normalised synonyms."""

    def __init__(self, annotator):
        keys = {}
        for key in annotator.automaton.keys():
            form = key.strip()
            keys.setdefault(form, annotator.automaton.get(key)[1])
        self.lookup = keys
        alternation = "|".join(r"[\W_]+".join(map(re.escape, k.split(" "))) for k in sorted(keys, key=len, reverse=True))
        self.pattern = re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE)
        self.squash = re.compile(r"[\W_]+")

    def annotate(self, text: str) -> list[tuple[int, int, str]]:
        out = []
        for m in self.pattern.finditer(text):
            cui = self.lookup.get(self.squash.sub(" ", m.group().lower()))
            if cui is not None:
                out.append((m.start(), m.end(), cui))
        return out


def rate(fn, captions, repeats: int) -> tuple[float, int]:
    best, found = 0.0, 0
    for _ in range(repeats):
        start = time.perf_counter()
        found = sum(len(fn(c)) for c in captions)
        best = max(best, len(captions) / (time.perf_counter() - start))
    return best, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    from medclip.concepts import ConceptAnnotator, load_vocabulary

    captions = read_captions()
    repeats = 3 if args.quick else 7
    t0 = time.perf_counter()
    vocab = load_vocabulary(SHARED / "vocab" / "mesh_anatomy_disease.tsv")
    annotator = ConceptAnnotator(vocab)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    baseline = RegexAnnotator(annotator)
    regex_build = time.perf_counter() - t0
    corpus = captions * (2 if args.quick else 5)
    ours, ours_found = rate(annotator.annotate, corpus, repeats)
    # The regex is ~3 orders of magnitude slower: time it on a prefix of the captions.
    sample = captions[: 200 if args.quick else 600]
    theirs, theirs_found = rate(baseline.annotate, sample, 1)
    ours_sample, ours_sample_found = rate(annotator.annotate, sample, repeats)
    print(f"captions: {len(captions)} MedPix captions x {len(corpus) // len(captions)} "
          f"(mean {sum(map(len, captions)) / len(captions):.0f} chars); vocabulary: {len(vocab)} MeSH descriptors, "
          f"{annotator.n_keys} match keys")
    print(f"aho-corasick annotator (with negation): {ours:,.0f} captions/s per core "
          f"({ours_found / len(corpus):.2f} mentions/caption; build {build:.2f} s)")
    print(f"regex alternation baseline (no negation), first {len(sample)} captions: {theirs:,.0f} captions/s "
          f"per core ({theirs_found / len(sample):.2f} matches/caption; build {regex_build:.2f} s); "
          f"annotator on the same captions: {ours_sample:,.0f} captions/s ({ours_sample_found / len(sample):.2f} "
          f"mentions/caption)")
    print(f"speed-up vs regex (same captions): {ours_sample / theirs:.0f}x; goal {GOAL:,} captions/s: {'met' if ours >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
