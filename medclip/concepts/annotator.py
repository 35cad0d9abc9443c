"""Dictionary concept annotator: one Aho-Corasick automaton over every synonym of a vocabulary.

A caption is lower-cased and split into words (remembering each word's character span), the words are
joined by single spaces and padded with a space at both ends, and the automaton runs once over that
string. Keys are the normalised synonyms padded the same way, so every hit starts and ends on a word
boundary; stems (CheXpert's "atelecta") have no trailing space and extend to the end of their word.
Among overlapping hits the longest wins; then each kept mention is checked for negation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from medclip._deps import require
from medclip.concepts.negation import NegationConfig, NegationDetector
from medclip.concepts.normalize import Words, inflected_variants, normalize_term
from medclip.concepts.vocab import RANK_VARIANT, Vocabulary
from medclip.errors import MedclipError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnnotatorConfig:
    negation: bool = True
    min_chars: int = 3  # shorter normalised synonyms ("ct", "b") match too much to be useful
    plural_variants: bool = True
    stop_terms: frozenset[str] = frozenset()  # normalised synonyms never matched
    negation_config: NegationConfig = field(default_factory=NegationConfig)

    def __post_init__(self):
        if self.min_chars < 1:
            raise MedclipError(f"min_chars must be >= 1, got {self.min_chars}")


def _automaton():
    return require("ahocorasick", "the concept annotator").Automaton()


class ConceptAnnotator:
    """Finds concept mentions: ``annotate(text) -> [{"start","end","cui","name","group","negated"}]``."""

    def __init__(self, vocab: Vocabulary, config: AnnotatorConfig | None = None):
        self.vocab = vocab
        self.config = config or AnnotatorConfig()
        self.negation = NegationDetector(self.config.negation_config) if self.config.negation else None
        best: dict[str, tuple[int, str]] = {}  # key -> (rank, cui): the lowest rank names the key
        skipped = 0
        for syn in vocab.synonyms:
            if syn.cui not in vocab.concepts:
                raise MedclipError(f"synonym {syn.text!r} names unknown concept {syn.cui!r}")
            norm = normalize_term(syn.text)
            if len(norm) < self.config.min_chars or norm in self.config.stop_terms:
                skipped += 1
                continue
            forms = [(norm, syn.rank)]
            if self.config.plural_variants and not syn.prefix:
                forms += [(v, max(syn.rank, RANK_VARIANT)) for v in inflected_variants(norm)]
            for form, rank in forms:
                key = " " + form + ("" if syn.prefix else " ")
                if key not in best or (rank, syn.cui) < best[key]:
                    best[key] = (rank, syn.cui)
        if not best:
            raise MedclipError("the vocabulary has no usable synonyms")
        self.automaton = _automaton()
        for key, (_, cui) in best.items():
            self.automaton.add_word(key, (len(key), cui))
        self.automaton.make_automaton()
        self.n_keys = len(best)
        log.debug("annotator: %d concepts, %d keys, %d synonyms skipped", len(vocab), len(best), skipped)

    def annotate(self, text: str) -> list[dict]:
        words = Words(text)
        hits = list(self.automaton.iter(words.norm))
        if not hits:
            return []
        spans = words.spans
        found = []
        for end_pos, (key_len, cui) in hits:
            first, last = words.word_range(end_pos, key_len)
            start, end = spans[first][0], spans[last][1]
            found.append((start - end, start, first, last, cui))
        found.sort()  # longest first, then leftmost
        taken: list[tuple[int, int]] = []
        out = []
        for _, start, first, last, cui in found:
            if any(first <= t_last and t_first <= last for t_first, t_last in taken):
                continue
            taken.append((first, last))
            end = spans[last][1]
            concept = self.vocab.concepts[cui]
            out.append({"start": start, "end": end, "cui": cui, "name": concept.name, "group": concept.group,
                        "negated": False})
        if self.negation is not None:
            triggers = self.negation.scan(text, words)
            for mention in out if triggers is not None else ():
                mention["negated"] = triggers.negated(mention["start"], mention["end"])
        out.sort(key=lambda m: m["start"])
        return out

    def annotate_captions(self, captions: Iterable[str]) -> list[dict]:
        """Mentions of several captions of one sample, each with its ``caption_index``."""
        return annotate_each(self.annotate, captions)


def annotate_each(annotate, captions: Iterable[str]) -> list[dict]:
    """``annotate`` applied to each caption; every mention records its ``caption_index``."""
    return [{**mention, "caption_index": index}
            for index, caption in enumerate(captions) for mention in annotate(caption)]
