"""Concept-name tokens: the pad id a tokenizer writes, the content tokens of a name, and one embedding
path from a name to the PC-Align concept head for training and for queries."""

from __future__ import annotations

import pytest
import torch
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

from medclip.concepts import ConceptScorer
from medclip.concepts.tokens import embed_names, name_token_mask, pad_token_id
from medclip.losses import Objective, ObjectiveConfig, World
from medclip.models import towers
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig

SOT, EOT = 49406, 49407


def test_name_mask_by_hand():
    ids = torch.tensor([
        [SOT, 320, 0, 321, EOT, 0, 0],  # an id equal to the pad id before the end token is a real token
        [SOT, 320, 321, 322, 323, 324, EOT],  # cut at the context length: the end token is the last one
        [SOT, EOT, 0, 0, 0, 0, 0],  # empty name: no content token
    ])
    assert name_token_mask(ids, 0).int().tolist() == [
        [0, 1, 1, 1, 0, 0, 0],
        [0, 1, 1, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 0, 0],
    ]


def test_name_mask_on_real_tokenizers(tiny_bert_encoder):
    bpe = SimpleTokenizer(context_length=16)
    # open_clip's BPE writes "!" as id 0, the id it pads with: "mass !#! x" keeps "x" and the "!".
    ids = bpe(["mass !#! x"])
    assert ids[0, :7].tolist() == [SOT, 4854, 0, 2, 256, 343, EOT]
    assert name_token_mask(ids, pad_token_id(bpe))[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 5]
    long_name = bpe([" ".join(["nodule"] * 20)])  # truncated: the end token takes the last position
    assert long_name[0, -1] == EOT and name_token_mask(long_name, 0)[0].sum() == 14
    wordpiece = tiny_bert_encoder.tokenizer
    ids = wordpiece(["lung nodule"])
    n_words = len(wordpiece.tokenizer.tokenize("lung nodule"))
    mask = name_token_mask(ids, pad_token_id(wordpiece))
    assert mask[0].nonzero().flatten().tolist() == list(range(1, 1 + n_words))


def test_pad_id_is_what_the_tokenizer_writes(tmp_path, tiny_bert_encoder):
    assert pad_token_id(SimpleTokenizer()) == 0  # open_clip's BPE pads with zeros
    assert pad_token_id(tiny_bert_encoder.tokenizer) == 0  # [PAD] is the first WordPiece entry
    # A vocabulary whose [PAD] is not id 0: the lookup follows the tokenizer, not a default.
    from transformers import BertTokenizerFast

    vocab = ["[UNK]", "[CLS]", "[SEP]", "[MASK]", "lung", "nodule", "[PAD]"]
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(str(tmp_path))
    tokenizer = HFTokenizer(str(tmp_path), context_length=8)
    assert pad_token_id(tokenizer) == 6
    ids = tokenizer(["lung nodule"])
    assert ids[0].tolist() == [1, 4, 5, 2, 6, 6, 6, 6]
    assert name_token_mask(ids, pad_token_id(tokenizer))[0].int().tolist() == [0, 1, 1, 0, 0, 0, 0, 0]


def _heads(model):
    torch.manual_seed(0)
    return ConceptHeads(ConceptHeadsConfig(towers.image_width(model), towers.text_width(model), 32))


@pytest.mark.parametrize("fixture", ["tiny_encoder", "tiny_bert_encoder"])
def test_training_and_queries_embed_a_name_the_same_way(fixture, request):
    """The concept vector a query gets is the one the objective trains for the same name."""
    encoder = request.getfixturevalue(fixture)
    encoder.heads, was_training = _heads(encoder.model).eval(), encoder.model.training
    try:
        names = ["pleural effusion", "nodule"]
        tokens = encoder.tokenizer(names, context_length=16)
        batch = {"images": torch.zeros(1, 3, 64, 64), "text": encoder.tokenize(["effusion and nodule"]),
                 "concept_spans": torch.tensor([[[1, 2], [3, 4]]]), "concept_ids": torch.tensor([[1, 2]]),
                 "concept_mask": torch.tensor([[True, True]]), "concept_name_tokens": tokens[None]}
        objective = Objective(ObjectiveConfig(use_concept_names=True), World.single(),
                              name_pad_id=pad_token_id(encoder.tokenizer))
        encoder.model.eval()
        with torch.no_grad():
            trained = objective.forward_features(encoder.model, encoder.heads, batch).concepts[0, 2:]
            by_hand = []
            for name in names:  # mean of the content-token states, then the concept head
                ids = encoder.tokenizer([name])
                _, states = towers.text_tokens(encoder.model, ids)
                n = int(name_token_mask(ids, 0).sum())
                by_hand.append(encoder.heads.embed_pooled_text(states[0, 1:1 + n].mean(0, keepdim=True))[0])
        queried = ConceptScorer(encoder, use_heads=True).concept_vectors(names)
        torch.testing.assert_close(torch.nn.functional.normalize(trained, dim=-1), queried)
        torch.testing.assert_close(torch.stack(by_hand), trained)
        torch.testing.assert_close(embed_names(encoder.model, encoder.heads, tokens, 0).detach(), trained)
    finally:
        encoder.heads = None
        encoder.model.train(was_training)


def test_concept_names_need_the_pad_id():
    from medclip.errors import MedclipError

    with pytest.raises(MedclipError, match="pad id"):
        Objective(ObjectiveConfig(use_concept_names=True))
