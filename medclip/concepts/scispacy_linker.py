"""Optional scispaCy UMLS linker behind the annotator's interface (never required).

scispaCy finds entity mentions with a statistical model and links them to UMLS CUIs by character
n-gram similarity; it handles unseen wordings the dictionary annotator misses, at a small fraction
of its speed. Its models and the linker's knowledge base are downloaded by scispaCy itself, so this
only works where the user installed them (pip install scispacy + a model such as en_core_sci_sm).
"""

from __future__ import annotations

from collections.abc import Iterable

from medclip.concepts.annotator import annotate_each
from medclip.concepts.negation import NegationConfig, NegationDetector
from medclip.concepts.vocab import UMLS_GROUPS
from medclip.errors import MedclipError


class ScispacyAnnotator:
    """``annotate(text)`` -> the same mention dicts as :class:`ConceptAnnotator`."""

    def __init__(self, model: str = "en_core_sci_sm", linker: str = "umls", threshold: float = 0.8,
                 negation: NegationConfig | None = NegationConfig()):
        try:
            import spacy
            from scispacy.linking import EntityLinker  # noqa: F401  (registers the "scispacy_linker" pipe)
        except ImportError as exc:
            raise MedclipError("the scispaCy linker needs scispacy and a model: pip install scispacy, then "
                               f"its {model} model (see scispaCy's documentation)") from exc
        try:
            self.nlp = spacy.load(model)
        except OSError as exc:
            raise MedclipError(f"cannot load the spaCy model {model!r}: {exc}") from exc
        self.nlp.add_pipe("scispacy_linker", config={"resolve_abbreviations": True, "linker_name": linker,
                                                      "threshold": threshold})
        self.linker = self.nlp.get_pipe("scispacy_linker")
        self.negation = NegationDetector(negation) if negation is not None else None

    def annotate(self, text: str) -> list[dict]:
        doc = self.nlp(text)
        out = []
        for ent in doc.ents:
            if not ent._.kb_ents:
                continue
            cui = ent._.kb_ents[0][0]
            entity = self.linker.kb.cui_to_entity[cui]
            group = next((UMLS_GROUPS[t] for t in entity.types if t in UMLS_GROUPS), "")
            out.append({"start": ent.start_char, "end": ent.end_char, "cui": cui, "name": entity.canonical_name,
                        "group": group, "negated": False})
        if self.negation is not None and out:
            triggers = self.negation.scan(text)
            for mention in out if triggers is not None else ():
                mention["negated"] = triggers.negated(mention["start"], mention["end"])
        return out

    def annotate_captions(self, captions: Iterable[str]) -> list[dict]:
        return annotate_each(self.annotate, captions)
