"""The objective on real (tiny) towers: both towers once, spans -> masks, IT + lambda * PC, accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from medclip.data.concepts import concept_key
from medclip.errors import MedclipError
from medclip.losses import Objective, ObjectiveConfig, World, concat_features
from medclip.models import towers
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig

CAPTIONS = ["ct shows a right lung nodule", "mri brain with no acute infarct",
            "chest x ray pleural effusion and lung nodule", "normal study"]
# (caption index, token span, cui, negated) -- spans in caption token positions (0 = start token).
MENTIONS = [(0, (3, 6), "C0034079", False), (0, (5, 6), "C0028259", False), (1, (5, 7), "C0021308", True),
            (2, (4, 6), "C0032227", False), (2, (7, 9), "C0028259", False)]


def _heads(model, seed=0):
    torch.manual_seed(seed)
    return ConceptHeads(ConceptHeadsConfig(towers.image_width(model), towers.text_width(model), 32))


def _batch(encoder, names: bool = False):
    g = torch.Generator().manual_seed(0)
    b, c = len(CAPTIONS), 2
    spans = torch.zeros(b, c, 2, dtype=torch.long)
    ids = torch.zeros(b, c, dtype=torch.long)
    mask = torch.zeros(b, c, dtype=torch.bool)
    name_texts = [[""] * c for _ in range(b)]
    slot = [0] * b
    for row, span, cui, negated in MENTIONS:
        k = slot[row]
        slot[row] += 1
        spans[row, k] = torch.tensor(span)
        ids[row, k] = concept_key(cui)
        mask[row, k] = not negated
        name_texts[row][k] = cui.lower()
    batch = {"images": torch.randn(b, 3, 64, 64, generator=g), "text": encoder.tokenize(CAPTIONS),
             "concept_spans": spans, "concept_ids": ids, "concept_mask": mask, "keys": [str(i) for i in range(b)]}
    if names:
        flat = encoder.tokenize([t for row in name_texts for t in row])
        batch["concept_name_tokens"] = flat.reshape(b, c, -1)[..., :16]
    return batch


def _grads(loss, modules):
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def test_compute_total_is_it_plus_weighted_pc_after_start_step(tiny_encoder):
    model, batch = tiny_encoder.model, _batch(tiny_encoder)
    heads = _heads(model)
    objective = Objective(ObjectiveConfig(pc_weight=0.5, pc_start_step=10), world=World.single())
    early = objective.compute(model, heads, batch, step=9)
    assert early["pc"].item() == 0.0 and torch.equal(early["total"], early["it"])
    late = objective.compute(model, heads, batch, step=10)
    assert late["pc"].item() > 0
    assert torch.allclose(late["total"], late["it"] + 0.5 * late["pc"])
    assert torch.allclose(late["it"], early["it"])
    grads = _grads(late["total"], [heads])
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    (g_visual,) = torch.autograd.grad(late["pc"], [model.visual.conv1.weight])
    assert g_visual.abs().sum() > 0  # PC-Align trains the image tower through its patch tokens


def test_it_features_match_open_clip_encoders(tiny_encoder):
    model, batch = tiny_encoder.model, _batch(tiny_encoder)
    features = Objective(world=World.single()).forward_features(model, None, batch)
    with torch.no_grad():
        ref_img = torch.nn.functional.normalize(model.encode_image(batch["images"]), dim=-1)
        ref_txt = torch.nn.functional.normalize(model.encode_text(batch["text"]), dim=-1)
    assert torch.allclose(features.image, ref_img, atol=1e-5) and torch.allclose(features.text, ref_txt, atol=1e-5)
    assert features.patches is None  # no heads: IT-Align only


def test_forward_features_then_losses_and_accumulation_concat(tiny_encoder):
    model, batch = tiny_encoder.model, _batch(tiny_encoder)
    heads = _heads(model)
    objective = Objective(ObjectiveConfig(pc_chunk_size=2), world=World.single())
    whole = objective.compute(model, heads, batch, step=0)
    parts = []
    for rows in (slice(0, 3), slice(3, 4)):  # the last caption has no concepts: its micro-batch has C = 1
        micro = {k: v[rows] for k, v in batch.items()}
        micro["concept_spans"] = micro["concept_spans"][:, : 2 if rows.stop == 3 else 1]
        micro["concept_ids"] = micro["concept_ids"][:, : micro["concept_spans"].shape[1]]
        micro["concept_mask"] = micro["concept_mask"][:, : micro["concept_spans"].shape[1]]
        parts.append(objective.forward_features(model, heads, micro).detach())
    full = objective.losses(concat_features(parts), 0, model, heads)
    for key in ("total", "it", "pc"):
        assert torch.allclose(full[key], whole[key], atol=1e-5), key


def test_sigmoid_needs_model_bias_and_uses_it(tiny_encoder):
    from medclip.models.loading import build_model

    batch = _batch(tiny_encoder)
    with pytest.raises(MedclipError, match="init_logit_bias"):
        Objective(ObjectiveConfig(it_kind="sigmoid"), world=World.single()).compute(
            tiny_encoder.model, None, batch, step=0)
    model = build_model({**tiny_encoder.model_cfg, "init_logit_bias": -3.0})
    objective = Objective(ObjectiveConfig(it_kind="sigmoid", pc_weight=0, sigmoid_init="siglip"), world=World.single())
    objective.init_parameters(model)
    assert model.logit_scale.item() == pytest.approx(math.log(10)) and model.logit_bias.item() == -10.0
    out = objective.compute(model, None, batch, step=0)
    (g_bias,) = torch.autograd.grad(out["total"], [model.logit_bias])
    assert g_bias.item() != 0


def test_concept_names_with_bert_tower(tiny_bert_encoder):
    model = tiny_bert_encoder.model
    batch = _batch(tiny_bert_encoder, names=True)
    heads = _heads(model)
    objective = Objective(ObjectiveConfig(use_concept_names=True, pc_chunk_size=3), world=World.single(),
                          name_pad_id=0)
    features = objective.forward_features(model, heads, batch)
    b, c = batch["concept_mask"].shape
    assert features.concepts.shape[:2] == (b, 2 * c)
    assert torch.equal(features.concept_mask[:, c:], batch["concept_mask"])  # every valid name has tokens
    out = objective.losses(features, 0, model, heads)
    assert torch.isfinite(out["pc"]) and out["pc"].item() > 0
    without = Objective(ObjectiveConfig(), world=World.single()).compute(model, heads, batch, step=0)
    assert not torch.allclose(out["pc"], without["pc"])
    del batch["concept_name_tokens"]
    with pytest.raises(MedclipError, match="concept_name_tokens"):
        objective.forward_features(model, heads, batch)


def test_unusable_spans_are_counted_and_skipped(tiny_encoder, caplog):
    model, batch = tiny_encoder.model, _batch(tiny_encoder)
    batch["concept_spans"][0, 0] = torch.tensor([5, 5])  # empty span
    batch["concept_spans"][2, 1] = torch.tensor([60, 70])  # past the context length
    objective = Objective(world=World.single())
    features = objective.forward_features(model, _heads(model), batch)
    assert objective.skipped_spans == 2 and "skipped 2 concept mention" in caplog.text
    assert not features.concept_mask[0, 0] and not features.concept_mask[2, 1]


def test_bad_config_and_batch_raise(tiny_encoder):
    with pytest.raises(MedclipError, match="it_kind"):
        ObjectiveConfig(it_kind="triplet")
    with pytest.raises(MedclipError, match="unknown objective option"):
        ObjectiveConfig.from_dict({"lambda": 1.0})
    with pytest.raises(MedclipError, match="sigmoid_init"):
        ObjectiveConfig(it_kind="infonce", sigmoid_init="siglip")
    with pytest.raises(MedclipError, match="pc_pool"):
        ObjectiveConfig.from_dict({"pc_pool": "mean"})
    batch = _batch(tiny_encoder)
    del batch["concept_spans"]
    with pytest.raises(MedclipError, match="concept_spans"):
        Objective(world=World.single()).compute(tiny_encoder.model, _heads(tiny_encoder.model), batch, step=0)


def test_convolutional_image_tower_feature_map_cells_are_the_patches(tiny_encoder):
    """A timm CNN trunk: its last feature map's cells serve as patches for PC-Align and heatmaps."""
    import json

    from medclip.models import towers
    from medclip.models.loading import build_model, encoder_from_state

    cfg = {"embed_dim": 32, "vision_cfg": {"timm_model_name": "resnet10t", "timm_pool": "avg", "timm_proj": "linear",
                                          "image_size": 64},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    model = build_model(json.loads(json.dumps(cfg)))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        pooled, tokens = towers.image_tokens(model, images)
        features = model.visual.trunk.forward_features(images)
        torch.testing.assert_close(pooled, model.encode_image(images))
    assert towers.grid_size(model) == (2, 2) == tuple(features.shape[-2:])
    assert tokens.shape == (2, 4, towers.image_width(model))
    torch.testing.assert_close(tokens[:, 1], features[:, :, 0, 1])  # row-major cells
    model.train()
    batch = _batch(tiny_encoder)
    heads = _heads(model)
    losses = Objective(ObjectiveConfig(pc_weight=1.0), world=World.single()).compute(model, heads, batch, step=0)
    (grad,) = torch.autograd.grad(losses["pc"], [model.visual.trunk.conv1[0].weight])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    encoder = encoder_from_state(cfg, model.state_dict())
    assert encoder.patch_embeddings(images).shape == (2, 4, 32)
