"""Concepts: dictionary annotation of captions (UMLS, MeSH, TSV, CheXpert vocabularies) and
concept-level explanations (concept maps, ranked concepts, concept bottleneck, grounding scores)."""

from typing import TYPE_CHECKING

from medclip import _lazy

if TYPE_CHECKING:  # imported on first use (medclip._lazy)
    from medclip.concepts.annotator import AnnotatorConfig, ConceptAnnotator
    from medclip.concepts.bottleneck import BottleneckConfig, ConceptBottleneck, train_concept_bottleneck
    from medclip.concepts.explain import ConceptMaps, annotate_images, explain, rank_concepts, render_heatmaps
    from medclip.concepts.grounding import (
        GroundingRecord,
        GroundingResult,
        energy_in_box,
        evaluate_grounding,
        grounding_records_from_shards,
        pointing_game,
    )
    from medclip.concepts.negation import NegationConfig
    from medclip.concepts.scoring import ConceptScorer
    from medclip.concepts.shards import annotate_jsonl, annotate_shard
    from medclip.concepts.tokens import char_to_token_spans
    from medclip.concepts.vocab import Concept, Synonym, Vocabulary, load_vocabularies, load_vocabulary

__all__ = [
    "AnnotatorConfig", "BottleneckConfig", "Concept", "ConceptAnnotator", "ConceptBottleneck", "ConceptMaps",
    "ConceptScorer", "GroundingRecord", "GroundingResult", "NegationConfig", "Synonym", "Vocabulary",
    "annotate_images", "annotate_jsonl", "annotate_shard", "char_to_token_spans", "energy_in_box", "explain",
    "evaluate_grounding", "grounding_records_from_shards", "load_vocabularies", "load_vocabulary",
    "pointing_game", "rank_concepts", "render_heatmaps", "train_concept_bottleneck",
]

_lazy.attach(__name__)
