"""IT-Align equals open_clip's ClipLoss / SigLipLoss in value and gradients (single process)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from medclip.errors import MedclipError
from medclip.losses import (
    Objective,
    ObjectiveConfig,
    World,
    clamp_logit_scales_,
    concat_features,
    hash_captions,
    infonce_loss,
    init_logit_params_,
    sigmoid_loss,
)
from medclip.losses.it_align import pool_positives


def _inputs(seed: int, n: int = 6, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    return image, text, log_scale, bias


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("with_bias", [False, True])
def test_infonce_matches_open_clip(with_bias):
    image, text, log_scale, bias = _inputs(0)
    b = bias if with_bias else None
    ours = infonce_loss(image, text, log_scale.exp(), b, world=World.single())
    ref = ClipLoss(local_loss=True, gather_with_grad=True)(image, text, log_scale.exp(), b)
    assert torch.allclose(ours, ref, atol=1e-6)
    params = (image, text, log_scale) + ((bias,) if with_bias else ())
    for a, r in zip(_grads(ours, *params), _grads(ref, *params)):
        assert torch.allclose(a, r, atol=1e-6)


def test_sigmoid_matches_open_clip():
    image, text, log_scale, bias = _inputs(1)
    ours = sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single())
    ref = SigLipLoss()(image, text, log_scale.exp(), bias)
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, r in zip(_grads(ours, image, text, log_scale, bias), _grads(ref, image, text, log_scale, bias)):
        assert torch.allclose(a, r, atol=1e-6)


def test_rank_offset_labels_match_open_clip_local_loss():
    """A rank's own rows sit at offset rank * B of the gathered batch, as in open_clip."""
    image, text, log_scale, _ = _inputs(2, n=8)
    scale = log_scale.exp()
    # Emulate rank 1 of 2 without a process group: gathered = rows 0..7, own = rows 4..7.
    ref = ClipLoss()(image, text, scale)  # the global loss
    per_rank = []
    for rank in range(2):
        own = slice(4 * rank, 4 * rank + 4)
        logits_i = scale * image[own] @ text.T
        logits_t = scale * text[own] @ image.T
        labels = torch.arange(4) + 4 * rank
        per_rank.append((F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2)
    assert torch.allclose(torch.stack(per_rank).mean(), ref, atol=1e-6)


def test_logit_scale_clamp_and_sigmoid_init(tiny_encoder):
    model = tiny_encoder.model
    saved = model.logit_scale.detach().clone()
    try:
        with torch.no_grad():
            model.logit_scale.fill_(9.0)
        clamp_logit_scales_(model, None)
        assert model.logit_scale.item() == pytest.approx(math.log(100))
        with pytest.raises(MedclipError, match="logit_bias"):
            init_logit_params_(model, "siglip")
        with pytest.raises(MedclipError, match="unknown logit init"):
            init_logit_params_(model, "nope")
    finally:
        with torch.no_grad():
            model.logit_scale.copy_(saved)


# ---- identical captions as positives (it_same_caption: positive) ------------------------------------

CAPTIONS = ["CT image of the Head.", "MRI image of the Spine.", "CT image of the Head.", "a lung nodule",
            "MRI image of the Spine.", "CT image of the Head."]


def _tokens(captions, length=12):
    """Deterministic fake token rows: one id per character, zero-padded (like a tokenizer's output)."""
    out = torch.zeros(len(captions), length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = [ord(ch) for ch in c[:length]]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def test_hash_captions_equal_rows_equal_keys():
    tokens = _tokens(CAPTIONS, length=30)
    keys = hash_captions(tokens)
    same = keys[:, None] == keys[None, :]
    expected = torch.tensor([[a == b for b in CAPTIONS] for a in CAPTIONS])
    assert torch.equal(same, expected)
    one_token_changed = tokens[:1].clone()
    one_token_changed[0, 25] = 1  # inside the padding
    assert hash_captions(one_token_changed) != keys[0]
    assert torch.equal(hash_captions(tokens.int()), keys)  # dtype does not matter
    with pytest.raises(MedclipError, match=r"\[B, L\]"):
        hash_captions(tokens[0])


def test_same_caption_positive_sigmoid_matches_pairwise_reference():
    image, text, log_scale, bias = _inputs(3)
    keys = hash_captions(_tokens(CAPTIONS))
    ours = sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single(), caption_keys=keys)
    logits = log_scale.exp() * image @ text.T + bias
    ref = 0.0
    for i, a in enumerate(CAPTIONS):
        for j, b in enumerate(CAPTIONS):
            ref = ref - F.logsigmoid((1.0 if a == b else -1.0) * logits[i, j]) / len(CAPTIONS)
    assert torch.allclose(ours, ref, atol=1e-5)
    params = (image, text, log_scale, bias)
    for a, r in zip(_grads(ours, *params), _grads(ref, *params)):
        assert torch.allclose(a, r, atol=1e-5)
    plain = sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single())
    assert abs(float(ours - plain)) > 1e-3
    unique = hash_captions(_tokens([f"caption {i}" for i in range(6)]))
    assert torch.allclose(sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single(), caption_keys=unique),
                          plain, atol=1e-6)


def test_infonce_identical_captions_already_train_as_shared_positives():
    """Why InfoNCE has no same-caption rule: with identical text rows, CLIP's one-hot targets and
    UniCL's shared targets give the same loss and the same tower gradients."""
    torch.manual_seed(0)
    text_tower = torch.nn.Linear(12, 8)
    image = F.normalize(torch.randn(len(CAPTIONS), 8), dim=-1)
    tokens = _tokens(CAPTIONS).float()
    same = torch.tensor([[a == b for b in CAPTIONS] for a in CAPTIONS], dtype=torch.float32)
    text = F.normalize(text_tower(tokens), dim=-1)
    logits = 10 * image @ text.T
    hard = infonce_loss(image, text, torch.tensor(10.0), None, world=World.single())
    soft_targets = same / same.sum(1, keepdim=True)
    shared = (F.cross_entropy(logits, soft_targets) + F.cross_entropy(logits.T, soft_targets)) / 2
    assert torch.allclose(hard, shared, atol=1e-6)
    for a, b in zip(_grads(hard, *text_tower.parameters()), _grads(shared, *text_tower.parameters())):
        assert torch.allclose(a, b, atol=1e-6)


def test_objective_same_caption_rule(tiny_encoder):
    model, tokenizer = tiny_encoder.model, tiny_encoder.tokenizer
    captions = ["ct image of the head.", "mri of the spine", "ct image of the head.", "a lung nodule"]
    batch = {"images": torch.randn(4, 3, 64, 64), "text": tokenizer(captions)}
    scale, bias = model.logit_scale.exp(), torch.tensor(-1.0)
    model_with_bias = SimpleNamespace(logit_scale=model.logit_scale, logit_bias=bias)
    losses = {}
    for rule in ("negative", "positive"):
        objective = Objective(ObjectiveConfig(it_kind="sigmoid", it_same_caption=rule, pc_weight=0.0),
                              world=World.single())
        features = objective.forward_features(model, None, batch, step=0)
        assert (features.caption_keys is not None) == (rule == "positive")
        losses[rule] = objective.losses(features, 0, model_with_bias, None)["it"]
    expected = sigmoid_loss(features.image, features.text, scale, bias, world=World.single(),
                            caption_keys=hash_captions(tokenizer(captions)))
    assert torch.allclose(losses["positive"], expected)
    assert abs(float(losses["positive"] - losses["negative"])) > 1e-4
    with pytest.raises(MedclipError, match="it_same_caption must be one of"):
        ObjectiveConfig(it_same_caption="ignore")
    with pytest.raises(MedclipError, match="applies to it_kind 'sigmoid' only"):
        ObjectiveConfig(it_kind="infonce", it_same_caption="positive")


def test_pool_positives_by_hand():
    """A caption is a positive of every image whose pool holds it, both directions."""
    # image 0 drew its report (10), its pool also holds the label caption 7; image 1 drew 7;
    # image 2 drew its report (12) and holds 7 too; image 3 drew 13, nothing shared.
    pools = torch.tensor([[10, 7], [7, 7], [12, 7], [13, 13]])
    image_to_text, text_to_image = pool_positives(pools, World.single())
    assert image_to_text.tolist() == [[True, True, False, False], [False, True, False, False],
                                      [False, True, True, False], [False, False, False, True]]
    assert text_to_image.tolist() == [[True, False, False, False], [True, True, True, False],
                                      [False, False, True, False], [False, False, False, True]]
    with pytest.raises(MedclipError, match=r"\[B, K >= 1\]"):
        pool_positives(pools[:, 0], World.single())


def test_pool_positives_infonce_is_the_soft_target_loss_and_plain_without_sharing():
    image, text, log_scale, bias = _inputs(4, n=4)
    pools = torch.tensor([[10, 7], [7, 7], [12, 7], [13, 13]])
    ours = infonce_loss(image, text, log_scale.exp(), None, world=World.single(), pool_keys=pools)
    logits = log_scale.exp() * image @ text.T
    image_to_text, text_to_image = pool_positives(pools, World.single())
    ref = 0.0
    for i in range(4):  # mean over each row's positives of -log softmax, both directions
        ref = ref - torch.log_softmax(logits[i], 0)[image_to_text[i]].mean() / 8
        ref = ref - torch.log_softmax(logits[:, i], 0)[text_to_image[i]].mean() / 8
    assert torch.allclose(ours, ref, atol=1e-6)
    params = (image, text, log_scale)
    for a, r in zip(_grads(ours, *params), _grads(ref, *params)):
        assert torch.allclose(a, r, atol=1e-6)
    plain = infonce_loss(image, text, log_scale.exp(), None, world=World.single())
    assert abs(float(ours - plain)) > 1e-3
    unshared = torch.tensor([[10, 20], [11, 21], [12, 12], [13, 23]])  # no caption in another image's pool
    assert torch.allclose(infonce_loss(image, text, log_scale.exp(), None, world=World.single(), pool_keys=unshared),
                          plain, atol=1e-6)
    sig = sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single(), pool_keys=pools)
    labels = image_to_text.float() * 2 - 1
    assert torch.allclose(sig, -F.logsigmoid(labels * (logits + bias)).sum() / 4, atol=1e-6)
    # with the same-caption rule too, identical token rows (3 and 0 here) are positives as well
    same = torch.tensor([5, 6, 7, 5])
    both = sigmoid_loss(image, text, log_scale.exp(), bias, world=World.single(), caption_keys=same, pool_keys=pools)
    either = image_to_text | (same[:, None] == same[None, :])
    assert either.sum() > image_to_text.sum()
    assert torch.allclose(both, -F.logsigmoid((either.float() * 2 - 1) * (logits + bias)).sum() / 4, atol=1e-6)


def test_objective_pool_positives_read_the_batch(tiny_encoder):
    model, tokenizer = tiny_encoder.model, tiny_encoder.tokenizer
    captions = ["ct image of the head.", "axial ct shows a mass", "ct image of the head.", "a lung nodule"]
    pools = torch.tensor([[1, 2], [3, 1], [1, 1], [4, 4]])
    batch = {"images": torch.randn(4, 3, 64, 64), "text": tokenizer(captions), "pool_keys": pools}
    objective = Objective(ObjectiveConfig(it_positives="pool", pc_weight=0.0), world=World.single())
    features = objective.forward_features(model, None, batch, step=0)
    assert torch.equal(features.pool_keys, pools)
    loss = objective.losses(features, 0, model, None)["it"]
    expected = infonce_loss(features.image, features.text, model.logit_scale.exp(), None, world=World.single(),
                            pool_keys=pools)
    assert torch.allclose(loss, expected)
    own = Objective(ObjectiveConfig(pc_weight=0.0), world=World.single())
    assert own.forward_features(model, None, batch, step=0).pool_keys is None
    halves = [objective.forward_features(model, None, {k: v[s] for k, v in batch.items()}, step=0)
              for s in (slice(0, 2), slice(2, 4))]
    # gradient accumulation's path: the parts' features concatenated give the whole batch's loss
    assert torch.allclose(objective.losses(concat_features(halves), 0, model, None)["it"], loss, atol=1e-6)
    halves[1].pool_keys = halves[1].pool_keys[:, :1]  # a narrower part is padded with its drawn key
    assert torch.equal(concat_features(halves).pool_keys, torch.tensor([[1, 2], [3, 1], [1, 1], [4, 4]]))
    with pytest.raises(MedclipError, match="needs the batch field pool_keys"):
        objective.forward_features(model, None, {k: v for k, v in batch.items() if k != "pool_keys"}, step=0)
    with pytest.raises(MedclipError, match="it_positives must be one of"):
        ObjectiveConfig(it_positives="labels")
