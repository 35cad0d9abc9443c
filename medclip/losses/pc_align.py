"""PC-Align: sigmoid alignment of image patches with the concepts mentioned in captions.

Score of image i for concept c: ``pool_p(t_c * cos(patch_ip, concept_c) + b_c)`` where pool is the
max over patches (ConceptCLIP), the mean of the top-k patches, or a smooth maximum
``tau * log(mean_p exp(logit_p / tau))`` (between the mean and the max; the max as tau -> 0).
t_c = exp(heads.logit_scale) and b_c = heads.logit_bias, separate from IT-Align's.

Pairs (image i of this rank, concept c of the global batch):
  * positive  -- c is a (non-negated, non-padding) concept of i's own caption;
  * ignored   -- c belongs to another caption but has the same concept id (CUI) as one of i's own
                 concepts (ConceptCLIP counts these as negatives: false negatives; ``same_concept:
                 'negative'`` does the same);
  * negative  -- every other valid concept.
With ``patch_negatives`` = w > 0, each negative pair also adds w times the mean over the image's patches
of the binary loss of that patch as a negative: an image without the concept says that none of its
patches shows it (multiple-instance learning's negative bag), which the max alone teaches one patch
per pair and step. The patches of a positive pair stay unlabelled but for the maximum.
With ``negated`` = 'negative', a concept the image's own caption says is absent ("no hemorrhage") is a
negative of that image wherever it occurs in the global batch, and an image whose caption names concepts
only negated (a normal study) is scored on those; 'ignore' leaves negated mentions out, as ConceptCLIP.
Images whose caption has no valid concept are not scored (an unannotated caption says nothing about
which concepts are absent); padding and negated mentions are never scored as concepts.

Normalisation (documented, SigLIP-like): the sum of the binary losses over counted pairs of the
global batch divided by the number of scored images in the global batch. Each rank returns
``world_size * (its own rows' sum) / global_images``, so the mean over ranks is the global loss and
DDP's gradient averaging yields the global gradients (as with open_clip's local_loss).

Memory: ``chunk_size`` concepts at a time. The chunked scores are a custom autograd Function that
keeps only its inputs, the [B, P] patch norms and (max / top-k) the winning patch indices, so forward
and backward hold O(B x P x chunk) besides the inputs, their gradients and the [B, N] scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from medclip.errors import MedclipError
from medclip.losses.distributed import (
    World,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_max,
    all_reduce_sum,
    resolve,
)

POOLS = ("max", "topk", "lse")
# A concept of another caption with the same id as one of the image's own: 'ignore' (medclip: not a
# negative, since the image does show it) or 'negative' (ConceptCLIP: a false negative).
SAME_CONCEPT_RULES = ("ignore", "negative")
# A concept the image's own caption names negated: 'ignore' (not scored) or 'negative' (module doc).
NEGATED_RULES = ("ignore", "negative")


@dataclass(frozen=True)
class PCAlignConfig:
    pool: str = "max"
    topk: int = 4  # patches averaged by pool='topk'
    lse_temperature: float = 0.1  # tau of pool='lse', in logit units
    chunk_size: int | None = 64  # concepts per chunk; None computes all concepts at once (naive)
    same_concept: str = "ignore"  # see SAME_CONCEPT_RULES
    patch_negatives: float = 0.0  # weight of the patch-level negatives (module doc); 0 = off
    negated: str = "ignore"  # see NEGATED_RULES

    def __post_init__(self):
        if self.pool not in POOLS:
            raise MedclipError(f"PC-Align pool must be one of {POOLS}, got {self.pool!r}")
        if self.same_concept not in SAME_CONCEPT_RULES:
            raise MedclipError(f"PC-Align same_concept must be one of {SAME_CONCEPT_RULES}, got {self.same_concept!r}")
        if self.topk < 1:
            raise MedclipError(f"PC-Align topk must be >= 1, got {self.topk}")
        if not self.lse_temperature > 0:
            raise MedclipError(f"PC-Align lse temperature must be > 0, got {self.lse_temperature}")
        if self.negated not in NEGATED_RULES:
            raise MedclipError(f"PC-Align negated must be one of {NEGATED_RULES}, got {self.negated!r}")
        if not self.patch_negatives >= 0:
            raise MedclipError(f"PC-Align patch_negatives must be >= 0, got {self.patch_negatives}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise MedclipError(f"PC-Align chunk size must be >= 1 or None, got {self.chunk_size}")


def _pool(logits: torch.Tensor, cfg: PCAlignConfig) -> torch.Tensor:
    """[B, P, K] patch logits -> [B, K] concept scores (autograd-differentiable)."""
    if cfg.pool == "max":
        return logits.max(dim=1).values
    if cfg.pool == "topk":
        k = min(cfg.topk, logits.shape[1])
        return logits.topk(k, dim=1).values.mean(dim=1)
    tau = cfg.lse_temperature
    return tau * (torch.logsumexp(logits / tau, dim=1) - math.log(logits.shape[1]))


def _pool_weights(logits: torch.Tensor, cfg: PCAlignConfig) -> torch.Tensor:
    """d score / d logits for _pool, [B, P, K]."""
    if cfg.pool == "max":
        index = logits.max(dim=1, keepdim=True).indices
        return torch.zeros_like(logits).scatter_(1, index, 1.0)
    if cfg.pool == "topk":
        k = min(cfg.topk, logits.shape[1])
        index = logits.topk(k, dim=1).indices
        return torch.zeros_like(logits).scatter_(1, index, 1.0 / k)
    return torch.softmax(logits / cfg.lse_temperature, dim=1)


NORM_EPS = 1e-12  # as F.normalize


def naive_scores(patches, concepts, scale, bias, cfg: PCAlignConfig) -> torch.Tensor:
    """Raw patches [B, P, D] x normalized concepts [N, D] -> [B, N], keeping [B, P, N] for autograd."""
    return _pool(scale * (F.normalize(patches, dim=-1, eps=NORM_EPS) @ concepts.T) + bias, cfg)


class _ChunkedScores(torch.autograd.Function):
    """Pooled scores computed ``chunk_size`` concepts at a time, forward and backward.

    The patch normalization is folded in (only the [B, P] inverse norms are kept, no normalized copy
    of the patches). Max and top-k pooling save the [B, k, N] winning patch indices and the pooled
    cosines [B, N], so backward recomputes nothing; the log-sum-exp pool recomputes each chunk's
    cosines in backward.
    """

    @staticmethod
    def forward(ctx, patches, concepts, scale, bias, cfg: PCAlignConfig):
        chunk = cfg.chunk_size
        inv_norm = patches.norm(dim=-1).clamp_min(NORM_EPS).reciprocal()  # [B, P]
        out = patches.new_empty(patches.shape[0], concepts.shape[0])
        k = min(cfg.topk, patches.shape[1]) if cfg.pool == "topk" else 1
        index = None
        if cfg.pool != "lse":
            index = torch.empty(patches.shape[0], k, concepts.shape[0], dtype=torch.long, device=patches.device)
        # Max / top-k: the winners are the same for cosines and logits (scale > 0), so keep their mean
        # cosine: backward then gets d/d scale and d/d bias without recomputing anything.
        pooled_cos = None if cfg.pool == "lse" else out
        for start in range(0, concepts.shape[0], chunk):
            sl = slice(start, start + chunk)
            cos = (patches @ concepts[sl].T).mul_(inv_norm[..., None])  # [B, P, K]
            if cfg.pool == "lse":
                out[:, sl] = _pool(cos.mul_(scale).add_(bias), cfg)
            else:
                values, index[:, :, sl] = cos.max(dim=1, keepdim=True) if k == 1 else cos.topk(k, dim=1)
                pooled_cos[:, sl] = values.mean(dim=1)
        if pooled_cos is not None:  # out was filled with pooled cosines; the scores are a new tensor
            out = torch.addcmul(bias.expand_as(out), pooled_cos, scale)
        ctx.cfg = cfg
        ctx.save_for_backward(patches, concepts, scale, bias, inv_norm, index, pooled_cos)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        patches, concepts, scale, bias, inv_norm, index, pooled_cos = ctx.saved_tensors
        cfg = ctx.cfg
        batch, n_patches, dim = patches.shape
        flat_patches = patches.reshape(-1, dim)
        grad_normed = torch.zeros(patches.shape, dtype=patches.dtype, device=patches.device)  # d/d unit patches
        grad_concepts = torch.empty_like(concepts)
        if pooled_cos is not None:  # score = scale * pooled cosine + bias
            grad_scale, grad_bias = (grad_scores * pooled_cos).sum(), grad_scores.sum()
        else:
            grad_scale, grad_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        for start in range(0, concepts.shape[0], cfg.chunk_size):
            sl = slice(start, start + cfg.chunk_size)
            c = concepts[sl]
            g_out = grad_scores[:, None, sl]
            if cfg.pool == "lse":
                cos = (patches @ c.T).mul_(inv_norm[..., None])  # recomputed [B, P, K]
                g = _pool_weights(scale * cos + bias, cfg).mul_(g_out)  # d loss / d logits
                grad_bias += g.sum()
                grad_scale += (g * cos).sum()
                del cos
            else:
                idx = index[:, :, sl]
                g = patches.new_zeros(batch, n_patches, idx.shape[-1])
                g.scatter_(1, idx, (g_out / idx.shape[1]).expand(idx.shape).contiguous())
            g.mul_(scale)  # d loss / d cosine
            grad_normed.view(-1, dim).addmm_(g.reshape(-1, g.shape[-1]), c)  # no [B, P, D] temporary
            g.mul_(inv_norm[..., None])  # cosine = (raw patch / |raw patch|) . c
            grad_concepts[sl] = g.reshape(-1, g.shape[-1]).T @ flat_patches
            del g
        # Back through the normalization, in place: (g - u (u . g)) / |x| with u = x / |x|.
        dots = torch.bmm(grad_normed.view(-1, 1, dim), patches.reshape(-1, dim, 1)).view(batch, n_patches)
        grad_normed.addcmul_(patches, (dots * inv_norm * inv_norm)[..., None], value=-1.0)
        grad_normed.mul_(inv_norm[..., None])
        return grad_normed, grad_concepts, grad_scale, grad_bias, None


def concept_scores(patches, concepts, scale, bias, cfg: PCAlignConfig) -> torch.Tensor:
    """Pooled scores [B, N] of patch embeddings [B, P, D] (normalized here) and unit concepts [N, D]."""
    if cfg.chunk_size is None or concepts.shape[0] <= cfg.chunk_size:
        return naive_scores(patches, concepts, scale, bias, cfg)
    return _ChunkedScores.apply(patches, concepts, scale, bias, cfg)


def patch_negative_loss(patches, concepts, scale, bias, negative: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Sum over negative pairs ([B, N] bool) of the mean over patches of -log sigmoid(-logit): raw patches
    [B, P, D], unit concepts [N, D]. Holds [B, P, chunk] logits with their graph per chunk of concepts."""
    units = F.normalize(patches, dim=-1, eps=NORM_EPS)
    total = patches.new_zeros(())
    step = chunk_size or concepts.shape[0]
    for start in range(0, concepts.shape[0], step):
        sl = slice(start, start + step)
        logits = scale * (units @ concepts[sl].T) + bias  # [B, P, chunk]
        total = total + (F.softplus(logits).mean(dim=1) * negative[:, sl].to(logits.dtype)).sum()
    return total


@dataclass
class GlobalConcepts:
    """The valid concepts of the whole (global) batch, padded to the same count on every rank."""

    embeddings: torch.Tensor  # [N, D] normalized, with gradients to the owning rank
    ids: torch.Tensor  # [N] long concept ids
    owners: torch.Tensor  # [N] long global image index of the caption the concept came from
    valid: torch.Tensor  # [N] bool, False for padding
    image_offset: int  # global index of this rank's first image


def gather_concepts(concepts, concept_mask, concept_ids, world: World) -> GlobalConcepts | None:
    """Compact the local valid concepts and gather them from every rank; None when no rank has any."""
    batch = concept_mask.shape[0]
    rows, cols = concept_mask.nonzero(as_tuple=True)
    local_n = rows.numel()
    n_max = all_reduce_max(local_n, world, device=concepts.device)
    sizes = torch.stack(all_gather_no_grad(torch.tensor([batch], device=concepts.device), world)).flatten()
    offset = int(sizes[:world.rank].sum())
    if n_max == 0:
        return None
    pad = n_max - local_n
    emb = torch.cat([concepts[rows, cols], concepts.new_zeros(pad, concepts.shape[-1])])
    meta = torch.stack([
        torch.cat([concept_ids[rows, cols], concept_ids.new_zeros(pad)]),
        torch.cat([rows + offset, rows.new_zeros(pad)]),
        torch.cat([torch.ones_like(rows), rows.new_zeros(pad)]),
    ], dim=1).to(torch.long)
    all_meta = torch.cat(all_gather_no_grad(meta, world))
    return GlobalConcepts(
        embeddings=torch.cat(all_gather_with_grad(emb, world)),
        ids=all_meta[:, 0],
        owners=all_meta[:, 1],
        valid=all_meta[:, 2].bool(),
        image_offset=offset,
    )


def pair_labels(global_concepts: GlobalConcepts, concept_mask, concept_ids, same_concept: str = "ignore",
                negated: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive [B, N] bool, counted [B, N] bool) for this rank's images against the global concepts;
    ``negated`` [B, C]: the slots of concept_ids the image's caption says are absent (counted as negatives)."""
    batch = concept_mask.shape[0]
    me = torch.arange(batch, device=concept_mask.device) + global_concepts.image_offset
    valid = global_concepts.valid[None, :]
    positive = valid & (global_concepts.owners[None, :] == me[:, None])
    negative = valid & ~positive
    same_id = concept_ids[:, :, None] == global_concepts.ids[None, None, :]  # [B, C, N]
    own_id = (same_id & concept_mask[:, :, None]).any(dim=1)  # another caption's mention of one of my own CUIs
    if same_concept == "ignore":  # ... is neither positive nor negative
        negative &= ~own_id
    scored_image = concept_mask.any(dim=1, keepdim=True)
    counted = (positive | negative) & scored_image
    if negated is not None:
        said_absent = (same_id & negated[:, :, None]).any(dim=1)
        counted |= said_absent & valid & ~own_id  # a concept the caption also names as present stays its own
    return positive, counted


def pc_align_loss(
    patch_embeds: torch.Tensor,
    concept_embeds: torch.Tensor,
    concept_mask: torch.Tensor,
    concept_ids: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    cfg: PCAlignConfig = PCAlignConfig(),
    world: World | None = None,
    concept_negated: torch.Tensor | None = None,
) -> torch.Tensor:
    """PC-Align loss of this rank (see module doc).

    patch_embeds [B, P, D] and concept_embeds [B, C, D] (not normalized), concept_mask [B, C] bool,
    concept_ids [B, C] long; logit_scale is log-space (t_c = exp), logit_bias is b_c; concept_negated [B, C]
    bool, the slots the caption names negated (read with ``cfg.negated`` 'negative').
    """
    world = resolve(world)
    if concept_embeds.shape[:2] != concept_mask.shape or concept_ids.shape != concept_mask.shape:
        raise MedclipError(
            f"concept embeddings {tuple(concept_embeds.shape)}, mask {tuple(concept_mask.shape)} and ids "
            f"{tuple(concept_ids.shape)} disagree on [B, C]")
    if patch_embeds.shape[0] != concept_mask.shape[0]:
        raise MedclipError(f"{patch_embeds.shape[0]} images but {concept_mask.shape[0]} concept rows")
    concept_mask = concept_mask.bool()
    negated = None
    if cfg.negated == "negative":
        if concept_negated is None or concept_negated.shape != concept_mask.shape:
            raise MedclipError(f"PC-Align negated 'negative' needs concept_negated [B, C] = {tuple(concept_mask.shape)}"
                               f", got {None if concept_negated is None else tuple(concept_negated.shape)}")
        negated = concept_negated.bool() & ~concept_mask
    scale = logit_scale.exp()
    concepts = F.normalize(concept_embeds, dim=-1)
    gathered = gather_concepts(concepts, concept_mask, concept_ids, world)
    # Keeps every input in the graph (DDP expects gradients for all parameters) when nothing is scored.
    kept = torch.where(concept_mask[..., None], concepts, torch.zeros_like(concepts))  # padding may hold anything
    zero = (patch_embeds.sum() + kept.sum() + scale + logit_bias) * 0.0
    if gathered is None:
        return zero
    positive, counted = pair_labels(gathered, concept_mask, concept_ids, cfg.same_concept, negated)
    scored = concept_mask.any(dim=1) if negated is None else concept_mask.any(dim=1) | negated.any(dim=1)
    scored_images = all_reduce_sum(scored.sum().to(patch_embeds.dtype), world)
    scores = concept_scores(patch_embeds, gathered.embeddings, scale, logit_bias, cfg)
    sign = positive.to(scores.dtype) * 2 - 1
    pair_loss = (-F.logsigmoid(sign * scores) * counted.to(scores.dtype)).sum()
    if cfg.patch_negatives > 0:
        pair_loss = pair_loss + cfg.patch_negatives * patch_negative_loss(
            patch_embeds, gathered.embeddings, scale, logit_bias, counted & ~positive, cfg.chunk_size)
    return zero + pair_loss * world.size / scored_images.clamp_min(1.0)
