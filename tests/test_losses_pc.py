"""PC-Align: gradcheck, chunked == naive, CUI masking, concept-free captions and padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medclip.errors import MedclipError
from medclip.losses import PCAlignConfig, World, pc_align_loss
from medclip.losses.pc_align import concept_scores, gather_concepts, naive_scores, pair_labels

SINGLE = World.single()


def _batch(seed=0, b=3, p=5, c=3, d=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, p, d, generator=g, dtype=dtype)
    concepts = torch.randn(b, c, d, generator=g, dtype=dtype)
    mask = torch.ones(b, c, dtype=torch.bool)
    mask[1, c - 1] = False  # padding
    ids = torch.arange(b * c).reshape(b, c)
    ids[2, 0] = ids[0, 1]  # image 2 shares a CUI with image 0
    scale = torch.tensor(1.5, dtype=dtype)
    bias = torch.tensor(-1.0, dtype=dtype)
    return patches, concepts, mask, ids, scale, bias


@pytest.mark.parametrize("pool", ["max", "topk", "lse"])
@pytest.mark.parametrize("chunk", [None, 2])
def test_pc_align_gradcheck_float64(pool, chunk):
    patches, concepts, mask, ids, scale, bias = _batch()
    cfg = PCAlignConfig(pool=pool, topk=2, lse_temperature=0.5, chunk_size=chunk)

    def loss(pt, ct, s, b):
        return pc_align_loss(pt, ct, mask, ids, s, b, cfg, world=SINGLE)

    inputs = tuple(t.clone().requires_grad_() for t in (patches, concepts, scale, bias))
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("pool", ["max", "topk", "lse"])
def test_chunked_equals_naive_scores_and_grads(pool):
    g = torch.Generator().manual_seed(3)
    patches = (torch.randn(4, 7, 8, generator=g) * torch.rand(4, 7, 1, generator=g) * 3).requires_grad_()
    concepts = F.normalize(torch.randn(11, 8, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-2.0, requires_grad=True)
    weights = torch.randn(4, 11, generator=g)
    results = []
    for cfg in (PCAlignConfig(pool=pool, topk=3, chunk_size=None), PCAlignConfig(pool=pool, topk=3, chunk_size=3)):
        out = concept_scores(patches, concepts, scale, bias, cfg)
        results.append((out, *torch.autograd.grad((out * weights).sum(), (patches, concepts, scale, bias))))
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_pool_definitions():
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]])  # unit vectors, P = 3
    concept = torch.tensor([[1.0, 0.0]])  # cosines 1, 0, 0.6
    s, b = torch.tensor(2.0), torch.tensor(-1.0)  # logits 1, -1, 0.2
    assert naive_scores(patches, concept, s, b, PCAlignConfig("max")).item() == pytest.approx(1.0)
    assert naive_scores(patches, concept, s, b, PCAlignConfig("topk", topk=2)).item() == pytest.approx(0.6)
    lse = naive_scores(patches, concept, s, b, PCAlignConfig("lse", lse_temperature=0.5)).item()
    expected = 0.5 * torch.log(torch.tensor([2.0, -2.0, 0.4]).exp().mean()).item()
    assert lse == pytest.approx(expected)
    sharp = naive_scores(patches, concept, s, b, PCAlignConfig("lse", lse_temperature=1e-3)).item()
    assert sharp == pytest.approx(1.0, abs=2e-3)  # smooth max tends to the max


def test_cui_masking_removes_exactly_the_duplicate_negatives():
    patches, concepts, mask, ids, scale, bias = _batch()
    gathered = gather_concepts(F.normalize(concepts, dim=-1), mask, ids, SINGLE)
    positive, counted = pair_labels(gathered, mask, ids)
    owners, cuis = gathered.owners, gathered.ids
    for i in range(3):
        own_cuis = set(ids[i][mask[i]].tolist())
        for n in range(len(owners)):
            is_own = owners[n].item() == i
            assert positive[i, n].item() == is_own
            duplicate = not is_own and cuis[n].item() in own_cuis
            assert counted[i, n].item() == (not duplicate)
    # The shared CUI (image 0's second concept == image 2's first) is ignored both ways, nothing else is.
    assert (~counted).sum().item() == 2
    # ConceptCLIP's rule (every other caption's concept is a negative) gives a different loss.
    ours = pc_align_loss(patches, concepts, mask, ids, scale, bias, world=SINGLE)
    distinct = pc_align_loss(patches, concepts, mask, torch.arange(9).reshape(3, 3), scale, bias, world=SINGLE)
    assert not torch.allclose(ours, distinct)
    # same_concept='negative' is that rule: every valid pair counts, the loss is the distinct-ids loss.
    conceptclip = PCAlignConfig(same_concept="negative")
    _, counted_all = pair_labels(gathered, mask, ids, conceptclip.same_concept)
    assert counted_all.sum().item() == counted.sum().item() + 2
    torch.testing.assert_close(pc_align_loss(patches, concepts, mask, ids, scale, bias, conceptclip, world=SINGLE),
                               distinct)
    with pytest.raises(MedclipError, match="same_concept"):
        PCAlignConfig(same_concept="positive")


def test_loss_value_by_hand():
    patches, concepts, mask, ids, scale, bias = _batch(c=2)
    mask[1, 1] = True
    loss = pc_align_loss(patches, concepts, mask, ids, scale.log(), bias, PCAlignConfig("max"), world=SINGLE)
    pn, cn = F.normalize(patches, dim=-1), F.normalize(concepts, dim=-1)
    total = 0.0
    for i in range(3):
        for j in range(3):
            for k in range(2):
                score = (scale * pn[i] @ cn[j, k] + bias).max()
                if i == j:
                    total += -F.logsigmoid(score)
                elif ids[j, k].item() not in ids[i].tolist():
                    total += -F.logsigmoid(-score)
    assert torch.allclose(loss, total / 3, atol=1e-10)


def test_captions_without_concepts_and_padding_contribute_nothing():
    patches, concepts, mask, ids, scale, bias = _batch(b=4)
    mask[3] = False  # image 3's caption has no concepts
    concepts[3] = float("nan")  # whatever sits in masked slots must not leak
    concepts[1, 2] = float("nan")  # padding slot
    full = pc_align_loss(patches.requires_grad_(), concepts, mask, ids, scale, bias, world=SINGLE)
    (grad,) = torch.autograd.grad(full, patches)
    without = pc_align_loss(patches[:3], concepts[:3], mask[:3], ids[:3], scale, bias, world=SINGLE)
    assert torch.allclose(full, without)
    assert torch.isfinite(grad).all() and grad[3].abs().sum() == 0


def test_batch_without_any_concept_is_zero_with_gradients():
    patches, concepts, _, ids, scale, bias = _batch()
    mask = torch.zeros(3, 1, dtype=torch.bool)
    heads_bias = bias.clone().requires_grad_()
    loss = pc_align_loss(patches.requires_grad_(), concepts[:, :1], mask, ids[:, :1], scale, heads_bias, world=SINGLE)
    loss.backward()
    assert loss.item() == 0.0 and heads_bias.grad is not None and heads_bias.grad.item() == 0.0


def test_bad_config_and_shapes_raise():
    with pytest.raises(MedclipError, match="pool"):
        PCAlignConfig(pool="mean")
    with pytest.raises(MedclipError, match="chunk"):
        PCAlignConfig(chunk_size=0)
    patches, concepts, mask, ids, scale, bias = _batch()
    with pytest.raises(MedclipError, match="disagree"):
        pc_align_loss(patches, concepts, mask[:, :2], ids, scale, bias, world=SINGLE)


@pytest.mark.parametrize("chunk", [None, 2])
def test_patch_negatives_by_hand(chunk):
    # Every patch of an image without the concept is a negative of it: w * mean over its patches, per
    # counted negative pair, beside the max-pooled pair loss; positives gain nothing.
    patches, concepts, mask, ids, scale, bias = _batch(c=2)
    mask[1, 1] = True
    cfg = PCAlignConfig("max", chunk_size=chunk, patch_negatives=0.7)
    loss = pc_align_loss(patches, concepts, mask, ids, scale.log(), bias, cfg, world=SINGLE)
    pn, cn = F.normalize(patches, dim=-1), F.normalize(concepts, dim=-1)
    total = 0.0
    for i in range(3):
        for j in range(3):
            for k in range(2):
                logits = scale * pn[i] @ cn[j, k] + bias  # [P]
                if i == j:
                    total += -F.logsigmoid(logits.max())
                elif ids[j, k].item() not in ids[i].tolist():
                    total += -F.logsigmoid(-logits.max()) + 0.7 * (-F.logsigmoid(-logits)).mean()
    assert torch.allclose(loss, total / 3, atol=1e-10)


def test_patch_negatives_gradcheck_and_validation():
    patches, concepts, mask, ids, scale, bias = _batch()
    cfg = PCAlignConfig("max", chunk_size=2, patch_negatives=1.0)
    inputs = tuple(t.clone().requires_grad_() for t in (patches, concepts, scale, bias))
    assert torch.autograd.gradcheck(lambda pt, ct, s, b: pc_align_loss(pt, ct, mask, ids, s, b, cfg, world=SINGLE),
                                    inputs, eps=1e-6, atol=1e-5)
    with pytest.raises(MedclipError, match="patch_negatives must be >= 0"):
        PCAlignConfig(patch_negatives=-0.5)
    from medclip.losses.objective import ObjectiveConfig

    assert ObjectiveConfig.from_dict({"pc_patch_negatives": 0.5}).pc_config().patch_negatives == 0.5
    with pytest.raises(MedclipError, match="patch_negatives"):
        ObjectiveConfig.from_dict({"pc_patch_negatives": -1})
