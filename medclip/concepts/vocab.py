"""Concept vocabularies: UMLS MRCONSO/MRSTY, MeSH descriptor TSV, plain TSV and CheXpert phrase lists.

Every reader returns a :class:`Vocabulary`: the concepts (id, preferred name, semantic group) and the
surface strings (synonyms) that name them. The annotator compiles all synonyms into one automaton.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medclip.errors import MedclipError

log = logging.getLogger(__name__)

# Rank of a surface string: lower wins when two concepts share the same normalised string.
RANK_PREFERRED, RANK_SYNONYM, RANK_VARIANT = 0, 1, 2

# MeSH tree letters -> UMLS-style semantic group abbreviations (for A and C: anatomy, disorders).
MESH_GROUPS = {"A": "ANAT", "B": "LIVB", "C": "DISO", "D": "CHEM", "E": "PROC", "F": "BEHV", "G": "PHEN",
               "H": "DISC", "I": "SOCI", "J": "TECH", "K": "HUMN", "L": "INFO", "M": "PERS", "N": "HLTH",
               "V": "PUBL", "Z": "GEOG"}

# UMLS semantic types (TUI) -> semantic group, for the groups that matter in radiology captions
# (from the UMLS Semantic Groups table); other types keep their semantic type name as group.
UMLS_GROUPS = {
    **dict.fromkeys(["T017", "T018", "T021", "T022", "T023", "T024", "T025", "T026", "T029", "T030", "T031"],
                    "ANAT"),
    **dict.fromkeys(["T019", "T020", "T033", "T037", "T046", "T047", "T048", "T049", "T050", "T184", "T190",
                     "T191"], "DISO"),
    **dict.fromkeys(["T058", "T059", "T060", "T061", "T062", "T063", "T065"], "PROC"),
    **dict.fromkeys(["T073", "T074", "T075", "T203"], "DEVI"),
}
# MRCONSO SUPPRESS values that mark obsolete or suppressible strings.
SUPPRESSED = {"O", "E", "Y"}


@dataclass(frozen=True)
class Concept:
    cui: str
    name: str
    group: str = ""


@dataclass(frozen=True)
class Synonym:
    text: str
    cui: str
    rank: int = RANK_SYNONYM
    prefix: bool = False  # the last word matches any word it begins (CheXpert stems: "atelecta")


@dataclass
class Vocabulary:
    concepts: dict[str, Concept] = field(default_factory=dict)
    synonyms: list[Synonym] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.concepts)

    def add(self, concept: Concept, texts: Iterable[str] = (), prefix: bool = False) -> None:
        if concept.cui not in self.concepts:
            self.concepts[concept.cui] = concept
        self.synonyms.append(Synonym(concept.name, concept.cui, RANK_PREFERRED, prefix))
        self.synonyms.extend(Synonym(t, concept.cui, RANK_SYNONYM, prefix) for t in texts if t and t != concept.name)

    def merge(self, other: Vocabulary) -> Vocabulary:
        """A vocabulary with both; on a shared concept id the first one's name and group win."""
        out = Vocabulary(dict(other.concepts), list(self.synonyms) + list(other.synonyms))
        out.concepts.update(self.concepts)
        return out


def _open_text(path: Path):
    if not path.is_file():
        raise MedclipError(f"vocabulary file not found: {path}")
    return path.open(encoding="utf-8", newline="")


def read_mesh_tsv(path: str | Path) -> Vocabulary:
    """MeSH descriptors as TSV (id, name, tree numbers separated by ';'), header optional.

    The semantic group comes from the first tree number's letter (A -> ANAT, C -> DISO, ...); the
    inverted form of a name ('Abdomen, Acute') is added as 'Acute Abdomen'.
    """
    from medclip.concepts.normalize import uninvert

    path = Path(path)
    vocab = Vocabulary()
    with _open_text(path) as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or (line_no == 1 and row[0].lower() in ("mesh_id", "id", "ui")):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise MedclipError(f"{path}:{line_no}: expected 'id<TAB>name<TAB>tree numbers', got {row!r}")
            cui, name = row[0].strip(), row[1].strip()
            trees = sorted(t for t in (row[2].split(";") if len(row) > 2 else []) if t.strip())
            group = MESH_GROUPS.get(trees[0][:1], trees[0][:1]) if trees else ""
            natural = uninvert(name)
            vocab.add(Concept(cui, name, group), [natural] if natural else [])
    if not vocab.concepts:
        raise MedclipError(f"{path}: no MeSH descriptors found")
    return vocab


def read_plain_tsv(path: str | Path) -> Vocabulary:
    """Plain TSV: id, name, synonyms separated by '|' (optional), group (optional). '#' lines are comments."""
    path = Path(path)
    vocab = Vocabulary()
    with _open_text(path) as handle:
        for line_no, row in enumerate(csv.reader(handle, delimiter="\t"), 1):
            if not row or row[0].startswith("#") or (line_no == 1 and row[0].lower() in ("id", "cui")):
                continue
            if len(row) < 2 or not row[0].strip() or not row[1].strip():
                raise MedclipError(f"{path}:{line_no}: expected 'id<TAB>name[<TAB>syn1|syn2[<TAB>group]]', "
                                   f"got {row!r}")
            synonyms = [s.strip() for s in row[2].split("|")] if len(row) > 2 else []
            group = row[3].strip() if len(row) > 3 else ""
            vocab.add(Concept(row[0].strip(), row[1].strip(), group), [s for s in synonyms if s])
    if not vocab.concepts:
        raise MedclipError(f"{path}: no concepts found")
    return vocab


def read_chexpert_phrases(directory: str | Path, exclude: Iterable[str] = ("no_finding",)) -> Vocabulary:
    """CheXpert labeler mention lists: one observation per ``NAME.txt``, one phrase per line.

    As in the CheXpert labeler, a phrase is a stem ('atelecta', 'consolidat') matching any word that
    begins with it, and '_' marks a required word boundary ('drain_', '_line_'). ``no_finding`` is
    excluded by default: its phrases name *other* abnormalities, not the observation "No Finding".
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise MedclipError(f"CheXpert phrase directory not found: {directory}")
    skip = set(exclude)
    vocab = Vocabulary()
    for path in sorted(directory.glob("*.txt")):
        if path.stem in skip:
            continue
        concept = Concept(f"CHEXPERT:{path.stem.upper()}", path.stem.replace("_", " ").capitalize(), "CHEXPERT")
        vocab.concepts[concept.cui] = concept
        for phrase in path.read_text(encoding="utf-8").splitlines():
            if not phrase.strip():
                continue
            whole_word = phrase.rstrip().endswith("_")
            text = phrase.replace("_", " ").strip()
            vocab.synonyms.append(Synonym(text, concept.cui, RANK_SYNONYM, prefix=not whole_word))
    if not vocab.concepts:
        raise MedclipError(f"{directory}: no CheXpert phrase files (*.txt)")
    return vocab


def read_mrsty(path: str | Path) -> dict[str, list[tuple[str, str]]]:
    """MRSTY.RRF: CUI -> [(TUI, semantic type name)]."""
    path = Path(path)
    out: dict[str, list[tuple[str, str]]] = {}
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            cols = line.rstrip("\n").split("|")
            if len(cols) < 4:
                raise MedclipError(f"{path}:{line_no}: not an MRSTY.RRF row (CUI|TUI|STN|STY|ATUI|CVF|)")
            out.setdefault(cols[0], []).append((cols[1], cols[3]))
    return out


def _matches_types(types: list[tuple[str, str]], wanted: set[str]) -> bool:
    return any(tui in wanted or sty in wanted or UMLS_GROUPS.get(tui) in wanted for tui, sty in types)


def read_mrconso(
    path: str | Path,
    mrsty: str | Path | None = None,
    semantic_types: Iterable[str] | None = None,
    languages: Iterable[str] = ("ENG",),
    sources: Iterable[str] | None = None,
) -> Vocabulary:
    """UMLS MRCONSO.RRF (CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF|).

    ``semantic_types`` keeps concepts whose MRSTY types include one of the given TUIs (T047),
    semantic type names (Disease or Syndrome) or semantic groups (DISO, ANAT); it needs ``mrsty``
    (default: MRSTY.RRF beside MRCONSO.RRF). Suppressed strings (SUPPRESS O/E/Y) are skipped. The
    preferred name is the concept's TS=P, STT=PF, ISPREF=Y string, else its first string.
    """
    path = Path(path)
    langs, sabs = set(languages), set(sources) if sources else None
    types: dict[str, list[tuple[str, str]]] = {}
    wanted = {t.strip() for t in semantic_types} if semantic_types else set()
    if wanted or mrsty is not None:
        mrsty = Path(mrsty) if mrsty is not None else path.with_name("MRSTY.RRF")
        types = read_mrsty(mrsty)
    names: dict[str, str] = {}
    preferred: dict[str, str] = {}
    strings: dict[str, list[str]] = {}
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            cols = line.rstrip("\n").split("|")
            if len(cols) < 17:
                raise MedclipError(f"{path}:{line_no}: not an MRCONSO.RRF row ({len(cols)} columns, want 18)")
            cui, lat, ts, stt, ispref, sab, text, suppress = (cols[0], cols[1], cols[2], cols[4], cols[6],
                                                               cols[11], cols[14], cols[16])
            if lat not in langs or suppress in SUPPRESSED or (sabs is not None and sab not in sabs) or not text:
                continue
            if wanted and not _matches_types(types.get(cui, []), wanted):
                continue
            names.setdefault(cui, text)
            if ts == "P" and stt == "PF" and ispref == "Y":
                preferred.setdefault(cui, text)
            strings.setdefault(cui, []).append(text)
    vocab = Vocabulary()
    for cui, texts in strings.items():
        cui_types = types.get(cui, [])
        group = next((UMLS_GROUPS[t] for t, _ in cui_types if t in UMLS_GROUPS), cui_types[0][1] if cui_types else "")
        vocab.add(Concept(cui, preferred.get(cui, names[cui]), group), dict.fromkeys(texts))
    if not vocab.concepts:
        raise MedclipError(f"{path}: no concepts left after the language/source/semantic-type filters")
    return vocab


VOCAB_FORMATS = ("auto", "umls", "mesh", "tsv", "chexpert")


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "umls" if (path / "MRCONSO.RRF").is_file() else "chexpert"
    if path.name.upper().startswith("MRCONSO"):
        return "umls"
    if path.suffix.lower() in (".tsv", ".txt"):
        with _open_text(path) as handle:
            first = handle.readline().lower().split("\t")
        if first and first[0].strip() in ("mesh_id", "ui") or (len(first) >= 3 and "tree" in first[2]):
            return "mesh"
        return "tsv"
    raise MedclipError(f"cannot tell the vocabulary format of {path}: pass a format (umls, mesh, tsv, chexpert)")


def load_vocabulary(
    path: str | Path,
    fmt: str = "auto",
    semantic_types: Iterable[str] | None = None,
    mrsty: str | Path | None = None,
) -> Vocabulary:
    """Read one vocabulary; ``fmt='auto'`` tells the format from the path and the header."""
    path = Path(path)
    if fmt not in VOCAB_FORMATS:
        raise MedclipError(f"unknown vocabulary format {fmt!r}; choose one of {', '.join(VOCAB_FORMATS)}")
    if not path.exists():
        raise MedclipError(f"vocabulary not found: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "umls":
        conso = path / "MRCONSO.RRF" if path.is_dir() else path
        return read_mrconso(conso, mrsty=mrsty, semantic_types=semantic_types)
    if semantic_types:
        raise MedclipError("semantic type filters apply to UMLS vocabularies (MRCONSO.RRF + MRSTY.RRF) only")
    if fmt == "mesh":
        return read_mesh_tsv(path)
    if fmt == "chexpert":
        return read_chexpert_phrases(path)
    return read_plain_tsv(path)


def load_vocabularies(paths: Iterable[str | Path], fmt: str = "auto", semantic_types=None, mrsty=None) -> Vocabulary:
    vocab = Vocabulary()
    for path in paths:
        vocab = vocab.merge(load_vocabulary(path, fmt, semantic_types, mrsty))
    if not vocab.concepts:
        raise MedclipError("no vocabulary given")
    return vocab
