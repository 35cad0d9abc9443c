"""Text normalisation shared by the vocabulary and the captions, and plural variants of terms.

Captions are only lower-cased and split into words (cheap, and the character offsets of every word
stay known); plural insensitivity is obtained on the vocabulary side instead, by adding the singular
and plural forms of each term's head word (its last word). Stemming the captions would be slower
and conflates words ("case"/"cases" vs "cas") in ways a lookup table of term variants does not.
"""

from __future__ import annotations

import re
from itertools import accumulate

# A word: a run of letters/digits; a trailing possessive 's stays inside the word's span and is dropped
# from its normalised form ("Alzheimer's disease" == "alzheimer disease").
WORD_RE = re.compile(r"[^\W_]+(?:['\u2019][sS](?![^\W_]))?")
POSSESSIVE_RE = re.compile(r"['\u2019]s$")
WORD_SPLIT_RE = re.compile("(" + WORD_RE.pattern + ")")


def normalize_words(text: str) -> list[str]:
    """Lower-cased words of ``text`` with possessives dropped; punctuation and hyphens separate words."""
    return [POSSESSIVE_RE.sub("", w) for w in WORD_RE.findall(text.lower())]


def normalize_term(text: str) -> str:
    """A term's normalised form: its words joined by single spaces."""
    return " ".join(normalize_words(text))


# Latin/Greek endings common in anatomy and pathology, singular -> plural.
_CLASSICAL = (("sis", "ses"), ("us", "i"), ("um", "a"), ("ex", "ices"), ("ix", "ices"), ("on", "a"), ("a", "ae"))
_SIBILANTS = ("s", "x", "z", "ch", "sh")
_VOWELS = set("aeiou")


def plural_forms(word: str) -> set[str]:
    """Plural forms of a (lower-case) noun: regular English and classical ones."""
    out: set[str] = set()
    if len(word) < 3 or not word.isalpha():
        return out
    for singular, plural in _CLASSICAL:
        if word.endswith(singular) and len(word) > len(singular) + 2:
            out.add(word[: -len(singular)] + plural)
    if word.endswith("y") and word[-2] not in _VOWELS:
        out.add(word[:-1] + "ies")
    elif word.endswith(_SIBILANTS):
        out.add(word + "es")
    else:
        out.add(word + "s")
    return out


def singular_forms(word: str) -> set[str]:
    """Singular forms of a (lower-case) word that looks plural; empty when it does not."""
    out: set[str] = set()
    if len(word) < 4 or not word.isalpha():
        return out
    for singular, plural in _CLASSICAL:
        if word.endswith(plural) and len(word) > len(plural) + 2:
            out.add(word[: -len(plural)] + singular)
    if word.endswith("ies"):
        out.add(word[:-3] + "y")
    elif word.endswith("es") and word[:-2].endswith(_SIBILANTS):
        out.add(word[:-2])
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        out.add(word[:-1])
    return out


def inflected_variants(term: str) -> set[str]:
    """Other number forms of a normalised multi-word term, inflecting its head (last) word."""
    words = term.split(" ")
    if not words or not words[-1]:
        return set()
    head, rest = words[-1], words[:-1]
    return {" ".join([*rest, form]) for form in plural_forms(head) | singular_forms(head)} - {term}


def uninvert(name: str) -> str | None:
    """MeSH/UMLS inverted names read naturally: 'Carcinoma, Non-Small-Cell Lung' -> 'Non-Small-Cell Lung
    Carcinoma'; 'Lymphoma, Large B-Cell, Diffuse' -> 'Diffuse Large B-Cell Lymphoma'. None if not inverted."""
    parts = [p.strip() for p in name.split(",")]
    if len(parts) < 2 or any(not p for p in parts):
        return None
    return " ".join(reversed(parts))


class Words:
    """A caption split into words: `norm` = " w1 w2 ... wn " (lower case, possessives dropped) and the
    words' character spans in the original text. An automaton hit on `norm` maps to word indices by
    counting the spaces before it (C speed), and through `spans` back to character offsets."""

    __slots__ = ("text", "norm", "_parts", "_spans")

    def __init__(self, text: str):
        self.text = text
        lower = text.lower()
        self._spans = None
        if len(lower) != len(text):  # rare Unicode whose lower case changes length: keep offsets exact
            found = list(WORD_RE.finditer(text))
            self._spans = [m.span() for m in found]
            words = [m.group().lower() for m in found]
        else:
            # [separator, word, separator, word, ..., separator]: lengths give every offset.
            self._parts = WORD_SPLIT_RE.split(lower)
            words = self._parts[1::2]
        if "'" in lower or "\u2019" in lower:
            words = [POSSESSIVE_RE.sub("", w) for w in words]
        self.norm = " " + " ".join(words) + " "

    @property
    def spans(self) -> list[tuple[int, int]]:
        if self._spans is None:
            ends = list(accumulate(map(len, self._parts)))
            self._spans = list(zip(ends[0::2], ends[1::2]))
        return self._spans

    def word_range(self, end_pos: int, key_len: int) -> tuple[int, int]:
        """First and last word index of an automaton hit on `norm` ending at ``end_pos``.

        Keys start with a space; whole-word keys end with one, stems inside their last word.
        """
        norm = self.norm
        return norm.count(" ", 0, end_pos - key_len + 1), norm.count(" ", 0, end_pos) - 1
