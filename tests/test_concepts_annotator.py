"""Concept annotator: hand-checked spans and concept ids, negation, overlaps, vocabulary readers."""

from __future__ import annotations

import pytest

from medclip.concepts import AnnotatorConfig, ConceptAnnotator, NegationConfig, load_vocabulary
from medclip.concepts.vocab import read_chexpert_phrases, read_mesh_tsv, read_mrconso, read_plain_tsv
from medclip.errors import MedclipError

PLAIN_TSV = """id\tname\tsynonyms\tgroup
C1\tPleural effusion\tpleural fluid\tDISO
C2\tEffusion\t\tDISO
C3\tLung\tpulmonary\tANAT
C4\tLung carcinoma\tcarcinoma of the lung\tDISO
C5\tSmall cell lung carcinoma\tSCLC\tDISO
C6\tArtery\t\tANAT
C7\tMetastasis\t\tDISO
C8\tHeart\t\tANAT
C9\tAirspace disease\tair space disease\tDISO
C10\tAlzheimer disease\t\tDISO
C11\tFracture\t\tDISO
C12\tPneumothorax\t\tDISO
C13\tRib\t\tANAT
"""


@pytest.fixture(scope="module")
def annotator(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "vocab.tsv"
    path.write_text(PLAIN_TSV)
    return ConceptAnnotator(load_vocabulary(path))


def spans(annotator, text):
    return [(text[m["start"]:m["end"]], m["cui"], m["negated"]) for m in annotator.annotate(text)]


# (caption, [(surface text, concept id, negated)]) -- checked by hand.
HAND_CHECKED = [
    ("Large right pleural effusion.", [("pleural effusion", "C1", False)]),
    ("Bilateral PLEURAL EFFUSIONS and a small effusion in the fissure.",
     [("PLEURAL EFFUSIONS", "C1", False), ("effusion", "C2", False)]),
    ("Small cell lung carcinoma of the left lung.",
     [("Small cell lung carcinoma", "C5", False), ("lung", "C3", False)]),
    ("Carcinoma of the lung with metastases to the ribs.",
     [("Carcinoma of the lung", "C4", False), ("metastases", "C7", False), ("ribs", "C13", False)]),
    ("Calcified coronary arteries; heartburn is not a heart finding.",
     [("arteries", "C6", False), ("heart", "C8", True)]),
    ("Patchy air-space disease in the right lung.", [("air-space disease", "C9", False), ("lung", "C3", False)]),
    ("Findings of Alzheimer's disease.", [("Alzheimer's disease", "C10", False)]),
    ("No pleural effusion or pneumothorax.", [("pleural effusion", "C1", True), ("pneumothorax", "C12", True)]),
    ("No effusion, pneumothorax or fracture.",
     [("effusion", "C2", True), ("pneumothorax", "C12", True), ("fracture", "C11", True)]),
    ("Without fracture. Large pneumothorax.", [("fracture", "C11", True), ("pneumothorax", "C12", False)]),
    ("No fracture but a large pneumothorax.", [("fracture", "C11", True), ("pneumothorax", "C12", False)]),
    ("Negative for pneumothorax; free of effusion.", [("pneumothorax", "C12", True), ("effusion", "C2", True)]),
    ("Rib fracture was ruled out. Absence of pneumothorax.",
     [("Rib", "C13", True), ("fracture", "C11", True), ("pneumothorax", "C12", True)]),
    ("No change in the left pleural effusion.", [("pleural effusion", "C1", False)]),
    ("No history of trauma in this patient who now presents with a rib fracture.",
     [("rib", "C13", False), ("fracture", "C11", False)]),
    ("SCLC, 1.5 cm, without pulmonary metastasis.",
     [("SCLC", "C5", False), ("pulmonary", "C3", True), ("metastasis", "C7", True)]),
    ("Heart-shaped artefact; pleuraleffusion is a typo.", [("Heart", "C8", False)]),
    ("", []),
]


@pytest.mark.parametrize("caption,expected", HAND_CHECKED)
def test_hand_checked_captions(annotator, caption, expected):
    assert spans(annotator, caption) == expected


def test_output_fields_follow_the_record_contract(annotator):
    mention = annotator.annotate("Left pleural effusion")[0]
    assert mention == {"start": 5, "end": 21, "cui": "C1", "name": "Pleural effusion", "group": "DISO",
                       "negated": False}
    several = annotator.annotate_captions(["lung", "no rib fracture"])
    assert [(m["cui"], m["caption_index"], m["negated"]) for m in several] == [
        ("C3", 0, False), ("C13", 1, True), ("C11", 1, True)]


def test_offsets_stay_exact_when_lower_case_changes_length(annotator):
    text = "\u0130stanbul patient: pleural effusion"  # 'İ'.lower() is two characters
    assert spans(annotator, text) == [("pleural effusion", "C1", False)]


def test_negation_can_be_disabled_and_commas_can_end_the_scope(tmp_path):
    path = tmp_path / "v.tsv"
    path.write_text(PLAIN_TSV)
    vocab = load_vocabulary(path)
    plain = ConceptAnnotator(vocab, AnnotatorConfig(negation=False))
    assert spans(plain, "No effusion.") == [("effusion", "C2", False)]
    comma = ConceptAnnotator(vocab, AnnotatorConfig(negation_config=NegationConfig(comma_ends_scope=True)))
    assert spans(comma, "No effusion, large pneumothorax.") == [("effusion", "C2", True), ("pneumothorax", "C12", False)]


def test_mesh_vocabulary_on_real_descriptors(shared_data):
    vocab = read_mesh_tsv(shared_data / "vocab" / "mesh_anatomy_disease.tsv")
    assert vocab.concepts["D010996"].name == "Pleural Effusion" and vocab.concepts["D010996"].group == "DISO"
    assert vocab.concepts["D008168"].group == "ANAT"
    annotator = ConceptAnnotator(vocab)
    text = ("Non-small-cell lung carcinoma of the right lung with a pleural effusion; no pneumothorax. "
            "Bone fractures of the femur head. The liver and kidneys are normal.")
    assert spans(annotator, text) == [
        ("Non-small-cell lung carcinoma", "D002289", False),  # inverted MeSH name read naturally
        ("lung", "D008168", False),
        ("pleural effusion", "D010996", False),
        ("pneumothorax", "D011030", True),
        ("Bone fractures", "D050723", False),
        ("femur head", "D005270", False),  # longest match beats "Femur" and "Head"
        ("liver", "D008099", False),
        ("kidneys", "D007668", False),
    ]


def test_chexpert_phrases_match_stems_and_respect_underscores(shared_data):
    vocab = read_chexpert_phrases(shared_data / "vocab" / "chexpert_phrases")
    assert "CHEXPERT:NO_FINDING" not in vocab.concepts  # its phrases name other findings
    annotator = ConceptAnnotator(vocab)
    text = "Bibasilar atelectatic changes and consolidations; no pneumothoraces. Left PICC line; drainage."
    got = [(s, c) for s, c, _ in spans(annotator, text)]
    assert got == [("atelectatic", "CHEXPERT:ATELECTASIS"), ("consolidations", "CHEXPERT:CONSOLIDATION"),
                   ("pneumothoraces", "CHEXPERT:PNEUMOTHORAX"), ("PICC", "CHEXPERT:SUPPORT_DEVICES"),
                   ("line", "CHEXPERT:SUPPORT_DEVICES")]  # 'drain_' needs a word end: not 'drainage'
    assert spans(annotator, "no pneumothoraces")[0][2] is True


def _rrf(rows):
    return "".join("|".join(r) + "|\n" for r in rows)


def test_umls_mrconso_with_semantic_type_filter(tmp_path):
    # Real MRCONSO column layout: CUI|LAT|TS|LUI|STT|SUI|ISPREF|AUI|SAUI|SCUI|SDUI|SAB|TTY|CODE|STR|SRL|SUPPRESS|CVF
    def row(cui, lat, ts, stt, ispref, text, suppress="N", sab="MSH"):
        return [cui, lat, ts, "L1", stt, "S1", ispref, "A1", "", "", "", sab, "PT", "X", text, "0", suppress, ""]

    (tmp_path / "MRCONSO.RRF").write_text(_rrf([
        row("C0032227", "ENG", "S", "VO", "N", "Effusion, Pleural"),
        row("C0032227", "ENG", "P", "PF", "Y", "Pleural effusion"),
        row("C0032227", "ENG", "S", "VO", "N", "Pleural fluid"),
        row("C0032227", "ENG", "S", "VO", "N", "Hydrothorax old", suppress="O"),
        row("C0032227", "FRE", "S", "VO", "N", "Epanchement pleural"),
        row("C0024109", "ENG", "P", "PF", "Y", "Lung"),
        row("C0012345", "ENG", "P", "PF", "Y", "Aspirin"),
    ]))
    (tmp_path / "MRSTY.RRF").write_text(_rrf([
        ["C0032227", "T047", "B2.2.1.2.1", "Disease or Syndrome", "AT1", ""],
        ["C0024109", "T023", "A1.2.3.1", "Body Part, Organ, or Organ Component", "AT2", ""],
        ["C0012345", "T121", "A1.4.1.1.1", "Pharmacologic Substance", "AT3", ""],
    ]))
    vocab = read_mrconso(tmp_path / "MRCONSO.RRF", semantic_types=["DISO", "T023"])
    assert set(vocab.concepts) == {"C0032227", "C0024109"}
    assert vocab.concepts["C0032227"].name == "Pleural effusion" and vocab.concepts["C0032227"].group == "DISO"
    annotator = ConceptAnnotator(vocab)
    assert spans(annotator, "pleural fluid in the lung; hydrothorax old; aspirin") == [
        ("pleural fluid", "C0032227", False), ("lung", "C0024109", False)]
    assert len(load_vocabulary(tmp_path, semantic_types=["T023"])) == 1  # a META directory works too
    with pytest.raises(MedclipError, match="no concepts left"):
        read_mrconso(tmp_path / "MRCONSO.RRF", semantic_types=["T999"])


@pytest.mark.parametrize("content,match", [
    ("C1\n", "expected 'id<TAB>name"),
    ("", "no concepts"),
])
def test_bad_plain_tsv_is_a_clear_error(tmp_path, content, match):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(MedclipError, match=match):
        read_plain_tsv(path)


def test_missing_vocabulary_and_bad_format_are_errors(tmp_path):
    with pytest.raises(MedclipError, match="not found"):
        load_vocabulary(tmp_path / "nope.tsv")
    (tmp_path / "v.tsv").write_text(PLAIN_TSV)
    with pytest.raises(MedclipError, match="unknown vocabulary format"):
        load_vocabulary(tmp_path / "v.tsv", fmt="xml")
    with pytest.raises(MedclipError, match="UMLS"):
        load_vocabulary(tmp_path / "v.tsv", semantic_types=["T047"])
