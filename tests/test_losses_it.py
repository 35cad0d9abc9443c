"""IT-Align equals open_clip's ClipLoss / SigLipLoss in value and gradients (single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from medclip.errors import MedclipError
from medclip.losses import World, clamp_logit_scales_, infonce_loss, init_logit_params_, sigmoid_loss


def _inputs(seed: int, n: int = 6, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    bias = torch.tensor(-3.0, requires_grad=True)
    return image, text, log_scale, bias


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


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
