"""NegEx-style negation: is a concept mention negated by a trigger in the same clause?

A pre-trigger ("no", "without", "negative for", ...) negates mentions after it, a post-trigger
("... was ruled out", "... is absent") mentions before it, each within a scope that ends at sentence
punctuation, at a conjunction that turns the clause ("but", "however", ...) or after ``max_words``
words. Pseudo-triggers ("no change", "not only") contain a trigger word but negate nothing.

Commas do not end a scope by default: radiology lists ("no effusion, pneumothorax or consolidation")
negate every item, and a missed negation would make an absent finding a positive for PC-Align.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from medclip._deps import require
from medclip.concepts.normalize import WORD_RE, Words, normalize_term

PRE_TRIGGERS = ("no", "not", "without", "negative for", "free of", "absence of", "denies", "denied",
                "never", "neither", "nor", "no evidence of", "no signs of", "rather than", "resolution of",
                "cannot see", "unremarkable for")
POST_TRIGGERS = ("ruled out", "is ruled out", "was ruled out", "were ruled out", "has been ruled out",
                 "is absent", "are absent", "was absent", "absent", "not seen", "not identified", "not present",
                 "not visualized", "not demonstrated", "not evident", "is excluded", "was excluded",
                 "has resolved", "have resolved", "resolved", "is negative", "was negative")
PSEUDO_TRIGGERS = ("no change", "no interval change", "no significant change", "no significant interval change",
                   "no increase", "no decrease", "not only", "not necessarily", "without change",
                   "without difficulty", "gram negative", "not rule out", "cannot exclude", "cannot be excluded",
                   "not excluded")
SCOPE_ENDS = ("but", "however", "although", "though", "except", "apart from", "aside from", "nevertheless",
              "yet", "whereas", "while", "which", "secondary to", "due to", "cause of", "source of")
SCOPE_PUNCTUATION = ".;:!?()[]\n"


@dataclass(frozen=True)
class NegationConfig:
    max_words: int = 6  # words between trigger and mention (NegEx uses 5)
    comma_ends_scope: bool = False
    pre_triggers: tuple[str, ...] = PRE_TRIGGERS
    post_triggers: tuple[str, ...] = POST_TRIGGERS
    pseudo_triggers: tuple[str, ...] = PSEUDO_TRIGGERS
    scope_ends: tuple[str, ...] = SCOPE_ENDS


class NegationDetector:
    """Finds triggers once per caption, then answers ``negated(start, end)`` per mention.

    Trigger phrases are matched like concept synonyms: an Aho-Corasick automaton over the caption's
    space-joined lower-case words (the annotator passes the string it already built), longest
    trigger first, so "no change" (pseudo) wins over "no" (pre) at the same place.
    """

    def __init__(self, config: NegationConfig | None = None):
        ahocorasick = require("ahocorasick", "negation detection")

        self.config = c = config or NegationConfig()
        self.automaton = ahocorasick.Automaton()
        # Later kinds overwrite earlier ones for the same phrase: pseudo beats pre/post, post beats pre.
        for kind, phrases in (("end", c.scope_ends), ("pre", c.pre_triggers), ("post", c.post_triggers),
                              ("pseudo", c.pseudo_triggers)):
            for phrase in phrases:
                key = " " + normalize_term(phrase) + " "
                self.automaton.add_word(key, (len(key), kind))
        self.automaton.make_automaton()
        self.punctuation = re.compile("[" + re.escape(SCOPE_PUNCTUATION + ("," if c.comma_ends_scope else "")) + "]")

    def scan(self, text: str, words: Words | None = None) -> Triggers | None:
        """Triggers of ``text`` (None when it has no negation trigger, the common case);
        ``words`` is the annotator's split of it (rebuilt if not given)."""
        words = words or Words(text)
        hits = []
        for end_pos, (key_len, kind) in self.automaton.iter(words.norm):
            first, last = words.word_range(end_pos, key_len)
            hits.append((first - last, first, last, kind))
        if not any(kind == "pre" or kind == "post" for *_, kind in hits):
            return None
        hits.sort()
        taken: list[tuple[int, int]] = []
        pre, post, ends = [], [], []
        for _, first, last, kind in hits:
            if any(first <= b and a <= last for a, b in taken):
                continue
            taken.append((first, last))
            span = (words.spans[first][0], words.spans[last][1])
            if kind == "pre":
                pre.append(span)
            elif kind == "post":
                post.append(span)
            elif kind == "end":
                ends.append(span[0])
        for m in self.punctuation.finditer(text):
            i = m.start()
            # A '.' between digits ("1.5 cm") is a decimal point, not the end of a sentence.
            if text[i] == "." and 0 < i < len(text) - 1 and text[i - 1].isdigit() and text[i + 1].isdigit():
                continue
            ends.append(i)
        pre.sort()
        post.sort()
        ends.sort()
        return Triggers(text, pre, post, ends, self.config.max_words)


@dataclass
class Triggers:
    text: str
    pre: list[tuple[int, int]]
    post: list[tuple[int, int]]
    ends: list[int]
    max_words: int

    def _open_gap(self, left: int, right: int) -> bool:
        """No scope end inside text[left:right] and at most max_words words in it."""
        i = bisect.bisect_left(self.ends, left)
        if i < len(self.ends) and self.ends[i] < right:
            return False
        return len(WORD_RE.findall(self.text, left, right)) <= self.max_words

    def negated(self, start: int, end: int) -> bool:
        if self.pre:
            i = bisect.bisect_right(self.pre, (start, start)) - 1
            while i >= 0 and self.pre[i][1] > start:  # a trigger overlapping the mention is part of it
                i -= 1
            if i >= 0 and self._open_gap(self.pre[i][1], start):
                return True
        if self.post:
            i = bisect.bisect_left(self.post, (end, end))
            if i < len(self.post) and self._open_gap(end, self.post[i][0]):
                return True
        return False
