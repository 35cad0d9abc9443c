"""Concept annotation speed: captions/s of medclip's annotator vs the dictionary matchers a user would pick.

Data: the MedPix captions (train + dev) of ../shared/data with the full MeSH anatomy + disease
vocabulary (vocab/mesh_anatomy_disease.tsv). Every matcher gets the same key set (the annotator's
normalised synonyms and plural variants), the same captions and the same repeats, interleaved (order
rotated each repeat) so a busy machine slows all alike; each reports its best and median rate.

- medclip ``ConceptAnnotator.annotate``: word normalisation with character offsets, longest-match
  overlap resolution, mention records, NegEx-style negation;
- flashtext ``KeywordProcessor.extract_keywords(span_info=True)``: the keyword trie users pick for
  dictionary matching (case-insensitive, word boundaries; no negation, no normalisation);
- pyahocorasick directly, the no-negation limit: the annotator's own automaton over the caption
  lower-cased with non-word runs collapsed by one regex, hits collected as they come (no offsets back to
  the caption, no overlap resolution, no records, no negation);
- one regex alternation of every key (word boundaries, case-insensitive), the textbook way. It is over
  three orders of magnitude slower, so besides the all-captions table of the first three, all four run on
  the first ``--regex-captions`` captions (150; same captions, same repeats for every matcher), unless
  ``--full-regex`` puts it in the all-captions table (about an hour on 2 cores).

Single process, so every figure is per core. Goal: >= 20,000 captions/s per core for medclip; the last
line is medclip's cost over the pyahocorasick limit.

    .venv/bin/python bench/annotate_speed.py [--quick] [--repeats 5] [--full-regex]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
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


def annotator_keys(annotator) -> dict[str, str]:
    """The annotator's match keys (normalised synonyms and variants, without their boundary padding) -> CUI."""
    keys: dict[str, str] = {}
    for key in annotator.automaton.keys():
        keys.setdefault(key.strip(), annotator.automaton.get(key)[1])
    return keys


class RegexMatcher:
    """One big alternation regex over all keys, longest first, word boundaries, case-insensitive."""

    def __init__(self, keys: dict[str, str]):
        self.lookup = keys
        alternation = "|".join(r"[\W_]+".join(map(re.escape, k.split(" "))) for k in sorted(keys, key=len, reverse=True))
        self.pattern = re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE)
        self.squash = re.compile(r"[\W_]+")

    def __call__(self, text: str) -> list[tuple[int, int, str]]:
        out = []
        for m in self.pattern.finditer(text):
            cui = self.lookup.get(self.squash.sub(" ", m.group().lower()))
            if cui is not None:
                out.append((m.start(), m.end(), cui))
        return out


def flashtext_matcher(keys: dict[str, str]):
    from flashtext import KeywordProcessor

    processor = KeywordProcessor(case_sensitive=False)
    for key, cui in keys.items():
        processor.add_keyword(key, cui)
    return lambda text: processor.extract_keywords(text, span_info=True)


def ahocorasick_limit(annotator):
    """The annotator's automaton used directly: hits only."""
    automaton, squash = annotator.automaton, re.compile(r"[\W_]+")
    return lambda text: list(automaton.iter(" " + squash.sub(" ", text.lower()).strip() + " "))


def interleaved_rates(matchers: dict, captions: list[str], repeats: int) -> dict[str, dict]:
    """captions/s of every matcher over the same captions, ``repeats`` interleaved passes each."""
    rates: dict[str, list[float]] = {name: [] for name in matchers}
    found: dict[str, int] = {}
    names = list(matchers)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            fn = matchers[name]
            start = time.perf_counter()
            found[name] = sum(len(fn(c)) for c in captions)
            rates[name].append(len(captions) / (time.perf_counter() - start))
    return {name: {"best": max(v), "median": statistics.median(v), "per_caption": found[name] / len(captions)}
            for name, v in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats, 50 regex captions")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--regex-captions", type=int, default=150)
    parser.add_argument("--full-regex", action="store_true", help="the regex on every caption too (slow)")
    args = parser.parse_args()
    from medclip.concepts import ConceptAnnotator, load_vocabulary

    captions = read_captions()
    repeats = 2 if args.quick else args.repeats
    t0 = time.perf_counter()
    vocab = load_vocabulary(SHARED / "vocab" / "mesh_anatomy_disease.tsv")
    annotator = ConceptAnnotator(vocab)
    builds = {"medclip annotator (negation)": time.perf_counter() - t0}
    keys = annotator_keys(annotator)
    t0 = time.perf_counter()
    flashtext = flashtext_matcher(keys)
    builds["flashtext keyword trie"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = RegexMatcher(keys)
    builds["regex alternation"] = time.perf_counter() - t0
    builds["pyahocorasick limit"] = 0.0  # the annotator's automaton
    fast = {"medclip annotator (negation)": annotator.annotate, "flashtext keyword trie": flashtext,
            "pyahocorasick limit": ahocorasick_limit(annotator)}

    print(f"captions: {len(captions)} MedPix captions (mean {sum(map(len, captions)) / len(captions):.0f} chars); "
          f"vocabulary: {len(vocab)} MeSH descriptors, {len(keys)} keys; {repeats} interleaved repeats each")
    full = interleaved_rates({**fast, "regex alternation": regex} if args.full_regex else fast, captions, repeats)
    n_prefix = len(captions) if args.full_regex else min(50 if args.quick else args.regex_captions, len(captions))
    prefix = full if args.full_regex else interleaved_rates({**fast, "regex alternation": regex},
                                                             captions[:n_prefix], repeats)
    print(f"{'matcher':30s} {'all captions (best / median)':>30s} {f'first {n_prefix} (best)':>18s} "
          f"{'hits/caption':>12s} {'build':>8s}")
    for name in [*fast, "regex alternation"]:
        all_rate = (f"{full[name]['best']:>12,.0f} / {full[name]['median']:>12,.0f}" if name in full
                    else f"{'(prefix only)':>27s}")
        print(f"{name:30s} {all_rate:>30s} {prefix[name]['best']:>18,.0f} "
              f"{prefix[name]['per_caption']:>12.2f} {builds[name]:>7.2f}s")
    ours, limit = full["medclip annotator (negation)"]["best"], full["pyahocorasick limit"]["best"]
    print(f"medclip vs flashtext: {ours / full['flashtext keyword trie']['best']:.2f}x the captions/s; "
          f"vs regex (first {n_prefix}): {prefix['medclip annotator (negation)']['best'] / prefix['regex alternation']['best']:.0f}x")
    print(f"medclip's cost over the pyahocorasick limit: {limit / ours:.2f}x the time per caption "
          f"({1e6 / ours - 1e6 / limit:.1f} us more per caption)")
    print(f"goal {GOAL:,} captions/s per core: {'met' if ours >= GOAL else 'NOT met'} ({ours:,.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
