"""IT-Align: global image-text alignment, InfoNCE (CLIP) or sigmoid (SigLIP).

Semantics match open_clip's ``ClipLoss(local_loss=True, gather_with_grad=True)`` and ``SigLipLoss``:
each rank scores its own rows against the batch gathered from all ranks (with gradients), so the
mean of the per-rank losses is the loss of the global batch, and DDP's gradient averaging gives the
global batch's gradients. Rank batches must have equal size (drop the last partial batch).

The scale and bias are the open_clip model's own ``logit_scale`` (log-space) and ``logit_bias``
parameters, so an exported model stays a plain open_clip model. open_clip clamps the scale in place
after each optimizer step; ``clamp_logit_scales_`` does the same here.

Identical captions: SigLIP labels every other pair of the batch negative, even when two images carry
the same caption (label-derived captions such as "CT image of the Head." repeat in a third of a
batch). Given ``caption_keys`` (``hash_captions(text_tokens)``), ``sigmoid_loss`` labels every pair
with identical captions positive. InfoNCE needs no such rule: identical captions have identical
embeddings, and then CLIP's targets give the same loss and parameter gradients as shared positives.

Caption pools (``pool_keys`` [n, K], the keys of each image's captions, column 0 the one drawn this
step): a caption drawn for one image also describes every other image whose pool holds it, e.g. "CT
image of the Head." describes every head CT, whichever caption those images drew. With pool keys every
such pair is a positive: InfoNCE spreads its target evenly over each row's positives (UniCL's
image-text-label contrast, Yang et al. 2022), sigmoid labels them 1. Without them (open_clip) the pair is
a negative: the loss pushes a head CT away from the caption that names it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from medclip.errors import MedclipError
from medclip.losses.distributed import (
    World,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_max,
    resolve,
)

# Initial (log scale, bias) for a sigmoid IT-Align: CLIP-style temperature or SigLIP's paper values.
SIGMOID_INITS = {
    "clip": (math.log(1 / 0.07), -10.0),
    "siglip": (math.log(10.0), -10.0),
}
MAX_LOGIT_SCALE = math.log(100.0)

_KEY_SEED = 20240611  # fixed: keys must agree across ranks and runs


def hash_captions(text: torch.Tensor) -> torch.Tensor:
    """[B] int64 key per caption: equal token rows give equal keys (a random linear hash mod 2**64,
    so distinct captions collide with probability ~2**-64 per pair)."""
    if text.ndim != 2:
        raise MedclipError(f"hash_captions expects [B, L] token ids, got shape {tuple(text.shape)}")
    generator = torch.Generator().manual_seed(_KEY_SEED)
    weights = torch.randint(1, 2**62, (text.shape[1],), generator=generator, dtype=torch.int64)
    # int64 products and sums wrap around: that is the mod 2**64 of the hash.
    return (text.long() * weights.to(text.device)).sum(dim=1)


def _same_caption(keys: torch.Tensor, world: World) -> torch.Tensor:
    """[n, N] bool: local caption i equals caption j of the global batch."""
    all_keys = torch.cat(all_gather_no_grad(keys, world))
    return keys[:, None] == all_keys[None, :]


def pad_pool_keys(pool_keys: torch.Tensor, width: int) -> torch.Tensor:
    """[B, K] pool keys -> [B, width], each row padded with its drawn caption's key (a repeat adds no positive)."""
    return torch.cat([pool_keys, pool_keys[:, :1].expand(-1, width - pool_keys.shape[1])], dim=1)


def pool_positives(pool_keys: torch.Tensor, world: World) -> tuple[torch.Tensor, torch.Tensor]:
    """([n, N] local image i's pool holds caption j of the global batch, [n, N] local caption i is in the
    pool of image j of the global batch); each pair's own caption is in its pool, so the diagonal is set."""
    if pool_keys.ndim != 2 or pool_keys.shape[1] < 1:
        raise MedclipError(f"pool_keys must be [B, K >= 1] caption keys, got shape {tuple(pool_keys.shape)}")
    # Ranks' batches may hold pools of different sizes: pad to the widest before the gather.
    width = all_reduce_max(pool_keys.shape[1], world, device=pool_keys.device)
    all_pools = torch.cat(all_gather_no_grad(pad_pool_keys(pool_keys, width), world))
    drawn, all_drawn = pool_keys[:, 0], all_pools[:, 0]
    image_to_text = (pool_keys[:, :, None] == all_drawn[None, None, :]).any(dim=1)
    text_to_image = (drawn[:, None, None] == all_pools[None, :, :]).any(dim=2)
    return image_to_text, text_to_image


def _soft_cross_entropy(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the target spread evenly over each row's positives."""
    targets = positives.float()
    return F.cross_entropy(logits.float(), targets / targets.sum(dim=1, keepdim=True))


def infonce_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    world: World | None = None,
    pool_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy over scaled cosine logits (features already normalized).

    ``logit_scale`` is the multiplier (``model.logit_scale.exp()``), as open_clip passes it. With
    ``pool_keys`` every image-caption pair whose caption is in the image's pool is a positive.
    """
    world = resolve(world)
    all_text = torch.cat(all_gather_with_grad(text_features, world))
    all_image = torch.cat(all_gather_with_grad(image_features, world))
    logits_per_image = logit_scale * image_features @ all_text.T
    logits_per_text = logit_scale * text_features @ all_image.T
    if logit_bias is not None:
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    if pool_keys is not None:
        image_to_text, text_to_image = pool_positives(pool_keys, world)
        return (_soft_cross_entropy(logits_per_image, image_to_text)
                + _soft_cross_entropy(logits_per_text, text_to_image)) / 2
    n = image_features.shape[0]
    labels = torch.arange(n, device=image_features.device) + n * world.rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    world: World | None = None,
    caption_keys: torch.Tensor | None = None,
    pool_keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairwise binary loss of the local images against every text of the global batch.

    Normalised like SigLIP: summed over texts, divided by the local batch size. With
    ``caption_keys``, every pair with identical captions is labelled positive; with ``pool_keys``,
    every pair whose caption is in the image's pool (with both, either makes a positive).
    """
    world = resolve(world)
    all_text = torch.cat(all_gather_with_grad(text_features, world))
    logits = logit_scale * image_features @ all_text.T + logit_bias
    n = image_features.shape[0]
    if pool_keys is not None:
        positives = pool_positives(pool_keys, world)[0]
    else:
        positives = torch.zeros_like(logits, dtype=torch.bool)
        own = torch.arange(n, device=logits.device) + n * world.rank
        positives[torch.arange(n, device=logits.device), own] = True
    if caption_keys is not None:  # identical tokens: also pairs whose texts differ only where tokens do not
        positives = positives | _same_caption(caption_keys, world)
    labels = positives.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(labels * logits).sum() / n


def model_logit_params(model: torch.nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(scale multiplier, bias) from the open_clip model's own parameters."""
    scale = model.logit_scale.exp()
    bias = getattr(model, "logit_bias", None)
    if kind == "sigmoid" and bias is None:
        raise MedclipError(
            "sigmoid IT-Align needs the model's logit_bias: create the model with 'init_logit_bias' "
            "in its config (e.g. -10)"
        )
    return scale, bias


def init_logit_params_(model: torch.nn.Module, preset: str) -> None:
    """Reset the model's logit scale and bias to a SIGMOID_INITS preset ('clip' or 'siglip')."""
    if preset not in SIGMOID_INITS:
        raise MedclipError(f"unknown logit init {preset!r}; choose one of {sorted(SIGMOID_INITS)}")
    if getattr(model, "logit_bias", None) is None:
        raise MedclipError("the model has no logit_bias: create it with 'init_logit_bias' in its config")
    scale, bias = SIGMOID_INITS[preset]
    with torch.no_grad():
        model.logit_scale.fill_(scale)
        model.logit_bias.fill_(bias)


@torch.no_grad()
def clamp_logit_scales_(*modules: torch.nn.Module | None, max_log_scale: float = MAX_LOGIT_SCALE) -> None:
    """Clamp each module's log-space ``logit_scale`` to [0, ln 100] in place (call after optimizer.step)."""
    for module in modules:
        if module is not None and getattr(module, "logit_scale", None) is not None:
            module.logit_scale.clamp_(0, max_log_scale)
