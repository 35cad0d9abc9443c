"""The training objective: total = IT-Align + lambda * PC-Align (PC-Align from a start step on).

The trainer calls ``Objective(config).compute(model, heads, batch, step)``. For gradient
accumulation with re-forward (open_clip's accum_freq) it calls the two halves separately:
``features = objective.forward_features(model, heads, batch)`` per micro-batch, then
``objective.losses(concat_features(all_features), step, model, heads)``.

Batch fields (see the data contract): images [B,3,H,W], text [B,L], concept_spans [B,C,2] (token
start, end-exclusive, position 0 = start token), concept_ids [B,C], concept_mask [B,C]; with
``use_concept_names``, concept_name_tokens [B,C,L'] (the concept's name tokenized like a caption,
pad ids where there is no concept); with ``pc_negated: negative``, concept_negated [B,C] (the slots
the caption names negated).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medclip.concepts.tokens import embed_names, name_token_mask
from medclip.errors import MedclipError
from medclip.losses.distributed import World
from medclip.losses.it_align import (
    SIGMOID_INITS,
    hash_captions,
    infonce_loss,
    init_logit_params_,
    model_logit_params,
    pad_pool_keys,
    sigmoid_loss,
)
from medclip.losses.pc_align import POOLS, PCAlignConfig, pc_align_loss
from medclip.models import towers
from medclip.models.heads import ConceptHeadsConfig

log = logging.getLogger(__name__)

IT_KINDS = ("infonce", "sigmoid")
SAME_CAPTION_RULES = ("negative", "positive")
IT_POSITIVES = ("own", "pool")


@dataclass
class ObjectiveConfig:
    it_kind: str = "infonce"  # 'infonce' (CLIP) or 'sigmoid' (SigLIP; the model needs a logit_bias)
    # Sigmoid start values of the model's scale/bias: 'clip' (ln 1/0.07, -10), 'siglip' (ln 10, -10), or
    # None to keep the model's own (its config's init_logit_scale / init_logit_bias).
    sigmoid_init: str | None = None
    # Sigmoid IT-Align, pairs whose captions are identical: 'negative' as in SigLIP / open_clip, or
    # 'positive', for recipes whose captions repeat (label captions). InfoNCE needs no rule (it_align.py).
    it_same_caption: str = "negative"
    # IT-Align's positives: 'own' (a caption is the positive of its own image only, as open_clip) or 'pool'
    # (also of every image of the global batch whose caption pool holds it: a label-derived caption names
    # every image with those labels; it_align.py). Both IT kinds; 'pool' needs the batch's pool_keys.
    it_positives: str = "own"
    pc_weight: float = 1.0  # lambda; 0 turns PC-Align off
    pc_start_step: int = 0  # ConceptCLIP turns PC-Align on in a second stage
    pc_pool: str = "max"  # 'max' | 'topk' | 'lse'
    pc_topk: int = 4
    pc_lse_temperature: float = 0.1
    pc_chunk_size: int | None = 64  # concepts per chunk; None = naive (all at once)
    # Another caption's mention of one of the image's own concept ids: 'ignore' (no false negatives)
    # or 'negative' (ConceptCLIP's form).
    pc_same_concept: str = "ignore"
    # Weight of the patch-level negatives (pc_align.py): every patch of an image without a concept is a
    # negative of it, not only the image's maximum; 0 = off (ConceptCLIP's form).
    pc_patch_negatives: float = 0.0
    # A concept the image's own caption names negated ("no hemorrhage"): 'ignore' (ConceptCLIP) or 'negative' of
    # that image, which also scores normal studies (pc_align.py).
    pc_negated: str = "ignore"
    use_concept_names: bool = False  # also align the embedding of each concept's name
    # What the patch head reads (models.heads.PATCH_STATES: the 'last' block, the patch 'embed'dings, the patch
    # 'stem' without positions or 'blockN') and the k x k neighbourhood it sees; kept in the exported heads'
    # config, so queries read the same.
    pc_patch_states: str = "last"
    pc_patch_context: int = 1
    pc_patch_head: str = "mlp"  # models.heads.PATCH_HEADS

    def __post_init__(self):
        if self.it_kind not in IT_KINDS:
            raise MedclipError(f"it_kind must be one of {IT_KINDS}, got {self.it_kind!r}")
        if self.sigmoid_init is not None and (self.it_kind != "sigmoid" or self.sigmoid_init not in SIGMOID_INITS):
            raise MedclipError(f"sigmoid_init must be one of {sorted(SIGMOID_INITS)} with it_kind 'sigmoid', "
                               f"got {self.sigmoid_init!r} with {self.it_kind!r}")
        if self.it_same_caption not in SAME_CAPTION_RULES:
            raise MedclipError(f"it_same_caption must be one of {SAME_CAPTION_RULES}, got {self.it_same_caption!r}")
        if self.it_same_caption == "positive" and self.it_kind != "sigmoid":
            raise MedclipError("it_same_caption 'positive' applies to it_kind 'sigmoid' only: with InfoNCE, "
                               "identical captions already train as shared positives")
        if self.it_positives not in IT_POSITIVES:
            raise MedclipError(f"it_positives must be one of {IT_POSITIVES}, got {self.it_positives!r}")
        if self.pc_weight < 0:
            raise MedclipError(f"pc_weight must be >= 0, got {self.pc_weight}")
        if self.pc_start_step < 0:
            raise MedclipError(f"pc_start_step must be >= 0, got {self.pc_start_step}")
        if self.pc_pool not in POOLS:
            raise MedclipError(f"pc_pool must be one of {POOLS}, got {self.pc_pool!r}")
        self.pc_config()  # validates the remaining PC-Align values
        try:
            ConceptHeadsConfig(1, 1, 1, **self.heads_options())
        except MedclipError as exc:
            raise MedclipError(f"objective.pc_{exc}") from None

    def heads_options(self) -> dict:
        """The recipe's choices for the PC-Align heads (models.heads.ConceptHeadsConfig fields)."""
        return {"patch_states": self.pc_patch_states, "patch_context": self.pc_patch_context,
                "patch_head": self.pc_patch_head}

    @classmethod
    def from_dict(cls, values: dict) -> ObjectiveConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedclipError(f"unknown objective option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    def pc_config(self) -> PCAlignConfig:
        return PCAlignConfig(pool=self.pc_pool, topk=self.pc_topk, lse_temperature=self.pc_lse_temperature,
                             chunk_size=self.pc_chunk_size, same_concept=self.pc_same_concept,
                             patch_negatives=self.pc_patch_negatives, negated=self.pc_negated)

    def pc_active(self, step: int | None) -> bool:
        return self.pc_weight > 0 and (step is None or step >= self.pc_start_step)


@dataclass
class Features:
    """What the losses need from one forward pass of both towers (and the PC-Align heads)."""

    image: torch.Tensor  # [B, D] normalized
    text: torch.Tensor  # [B, D] normalized
    caption_keys: torch.Tensor | None = None  # [B] int64, equal for identical captions (it_same_caption)
    patches: torch.Tensor | None = None  # [B, P, Dc] heads.embed_patches, not normalized
    concepts: torch.Tensor | None = None  # [B, C, Dc] span (and name) embeddings, not normalized
    concept_mask: torch.Tensor | None = None  # [B, C] bool
    concept_ids: torch.Tensor | None = None  # [B, C] long
    pool_keys: torch.Tensor | None = None  # [B, K] int64 caption keys of each image's pool (it_positives 'pool')
    concept_negated: torch.Tensor | None = None  # [B, C] bool, concepts the caption names negated (pc_negated)

    @property
    def has_concepts(self) -> bool:
        return self.patches is not None

    def detach(self) -> Features:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return Features(*(t.detach() if isinstance(t, torch.Tensor) else t for t in values))


def _pad_concepts(t: torch.Tensor, size: int, value=0) -> torch.Tensor:
    pad = size - t.shape[1]
    if pad == 0:
        return t
    return torch.cat([t, t.new_full((t.shape[0], pad, *t.shape[2:]), value)], dim=1)


def concat_features(parts: list[Features]) -> Features:
    """Features of several micro-batches as one batch (concept slots padded to the largest C)."""
    if not parts:
        raise MedclipError("no features to concatenate")
    image = torch.cat([p.image for p in parts])
    text = torch.cat([p.text for p in parts])
    keys = None if parts[0].caption_keys is None else torch.cat([p.caption_keys for p in parts])
    pools = None
    if parts[0].pool_keys is not None:
        width = max(p.pool_keys.shape[1] for p in parts)
        pools = torch.cat([pad_pool_keys(p.pool_keys, width) for p in parts])
    if not all(p.has_concepts for p in parts):
        return Features(image, text, keys, pool_keys=pools)
    c = max(p.concept_mask.shape[1] for p in parts)
    return Features(
        image, text, keys, pool_keys=pools,
        patches=torch.cat([p.patches for p in parts]),
        concepts=torch.cat([_pad_concepts(p.concepts, c) for p in parts]),
        concept_mask=torch.cat([_pad_concepts(p.concept_mask, c, False) for p in parts]),
        concept_ids=torch.cat([_pad_concepts(p.concept_ids, c) for p in parts]),
        concept_negated=None if parts[0].concept_negated is None
        else torch.cat([_pad_concepts(p.concept_negated, c, False) for p in parts]),
    )


class Objective:
    def __init__(self, config: ObjectiveConfig | None = None, world: World | None = None,
                 name_pad_id: int | None = None):
        self.config = config or ObjectiveConfig()
        self.world = world  # None: ask torch.distributed at every call
        # The id concept_name_tokens are padded with: medclip.concepts.tokens.pad_token_id(tokenizer).
        if self.config.use_concept_names and name_pad_id is None:
            raise MedclipError("use_concept_names needs the tokenizer's pad id: "
                               "Objective(config, name_pad_id=pad_token_id(tokenizer))")
        self.name_pad_id = name_pad_id
        self.skipped_spans = 0  # concept mentions dropped because their token span was unusable

    def init_parameters(self, model) -> None:
        """Apply ``sigmoid_init`` to the model's logit scale and bias (a fresh run only, not a resume)."""
        if self.config.sigmoid_init is not None:
            init_logit_params_(model, self.config.sigmoid_init)

    # ---- batch -> features -------------------------------------------------------------------------

    def span_mask(self, concept_spans: torch.Tensor, concept_mask: torch.Tensor, length: int):
        """([B, C, L] bool span mask, [B, C] mask with unusable spans dropped and counted)."""
        start, end = concept_spans[..., 0], concept_spans[..., 1]
        usable = (start >= 0) & (end <= length) & (start < end)
        bad = concept_mask & ~usable
        n_bad = int(bad.sum())
        if n_bad:
            self.skipped_spans += n_bad
            log.warning("skipped %d concept mention(s) with spans outside [0, %d) or empty (%d so far)",
                        n_bad, length, self.skipped_spans)
        mask = concept_mask & usable
        positions = torch.arange(length, device=concept_spans.device)
        spans = (positions >= start[..., None]) & (positions < end[..., None]) & mask[..., None]
        return spans, mask

    def _concept_fields(self, batch: dict, batch_size: int):
        missing = [k for k in ("concept_spans", "concept_ids", "concept_mask") if k not in batch]
        if missing:
            raise MedclipError(f"PC-Align needs batch fields {missing} (see the training batch contract)")
        spans, ids, mask = batch["concept_spans"], batch["concept_ids"], batch["concept_mask"].bool()
        if spans.ndim != 3 or spans.shape[-1] != 2 or spans.shape[:2] != mask.shape or ids.shape != mask.shape \
                or mask.shape[0] != batch_size:
            raise MedclipError(
                f"concept fields disagree: concept_spans {tuple(spans.shape)} (want [B, C, 2]), concept_ids "
                f"{tuple(ids.shape)}, concept_mask {tuple(mask.shape)}, batch size {batch_size}")
        return spans, ids.long(), mask

    def _name_embeddings(self, model, heads, batch, mask: torch.Tensor):
        """[B, C, Dc] embeddings of the concept names and the [B, C] mask of names that have tokens."""
        if "concept_name_tokens" not in batch:
            raise MedclipError("use_concept_names needs the batch field concept_name_tokens [B, C, L']")
        names = batch["concept_name_tokens"]
        if names.ndim != 3 or names.shape[:2] != mask.shape:
            raise MedclipError(f"concept_name_tokens must be [B, C, L'] with [B, C] = {tuple(mask.shape)}, "
                               f"got {tuple(names.shape)}")
        rows, cols = mask.nonzero(as_tuple=True)
        ids = names[rows, cols].long()
        words = name_token_mask(ids, self.name_pad_id)
        out = embed_names(model, heads, ids, self.name_pad_id) if len(ids) else None
        dim = heads.config.embed_dim
        embeds = torch.zeros(*mask.shape, dim, dtype=out.dtype if out is not None else torch.float32,
                             device=mask.device)
        name_mask = torch.zeros_like(mask)
        if out is not None:
            embeds = embeds.index_put((rows, cols), out)
            name_mask[rows, cols] = words.any(dim=1)
        return embeds, name_mask

    def _pool_keys(self, batch: dict, batch_size: int) -> torch.Tensor | None:
        if self.config.it_positives != "pool":
            return None
        pools = batch.get("pool_keys")
        if pools is None:
            raise MedclipError("objective.it_positives 'pool' needs the batch field pool_keys [B, K] (the caption "
                               "keys of each sample's pool, which medclip's training stream gives)")
        if pools.ndim != 2 or pools.shape[0] != batch_size or pools.shape[1] < 1:
            raise MedclipError(f"pool_keys must be [B, K >= 1] with B = {batch_size}, got {tuple(pools.shape)}")
        return pools

    def forward_features(self, model, heads, batch: dict, step: int | None = None) -> Features:
        """Run both towers once; add PC-Align's patch and concept embeddings when PC-Align is active."""
        for key in ("images", "text"):
            if key not in batch:
                raise MedclipError(f"training batch has no {key!r} field")
        images, text = batch["images"], batch["text"]
        if images.shape[0] != text.shape[0]:
            raise MedclipError(f"{images.shape[0]} images but {text.shape[0]} captions in the batch")
        pc_on = heads is not None and self.config.pc_active(step)
        image_pooled, patch_states = towers.image_tokens(model, images, heads.config.patch_states if pc_on else "last")
        text_pooled, token_states = towers.text_tokens(model, text)
        keys = hash_captions(text) if self.config.it_same_caption == "positive" else None
        features = Features(F.normalize(image_pooled, dim=-1), F.normalize(text_pooled, dim=-1), keys,
                            pool_keys=self._pool_keys(batch, images.shape[0]))
        if not pc_on:
            return features
        spans, ids, mask = self._concept_fields(batch, images.shape[0])
        negated = self._negated(batch, mask)
        span_mask, mask = self.span_mask(spans, mask, text.shape[1])
        concepts = heads.embed_spans(token_states, span_mask)
        if self.config.use_concept_names:
            names, name_mask = self._name_embeddings(model, heads, batch, mask)
            # Names are extra mentions of the same concepts: positives for their own image, and the
            # same CUI rule keeps them out of the other images' negatives.
            concepts = torch.cat([concepts, names.to(concepts.dtype)], dim=1)
            ids = torch.cat([ids, ids], dim=1)
            mask = torch.cat([mask, name_mask], dim=1)
            negated = None if negated is None else torch.cat([negated, torch.zeros_like(negated)], dim=1)
        features.patches = heads.embed_patches(patch_states, towers.grid_size(model))
        features.concepts, features.concept_mask, features.concept_ids = concepts, mask, ids
        features.concept_negated = negated
        return features

    def _negated(self, batch: dict, mask: torch.Tensor) -> torch.Tensor | None:
        if self.config.pc_negated != "negative":
            return None
        negated = batch.get("concept_negated")
        if negated is None or negated.shape != mask.shape:
            raise MedclipError(f"objective.pc_negated 'negative' needs the batch field concept_negated [B, C] = "
                               f"{tuple(mask.shape)} (medclip's training stream gives it), got "
                               f"{None if negated is None else tuple(negated.shape)}")
        return negated.bool()

    # ---- features -> losses ------------------------------------------------------------------------

    def losses(self, features: Features, step: int, model, heads) -> dict[str, torch.Tensor]:
        cfg = self.config
        scale, bias = model_logit_params(model, cfg.it_kind)
        if cfg.it_kind == "sigmoid":
            it = sigmoid_loss(features.image, features.text, scale, bias, world=self.world,
                              caption_keys=features.caption_keys, pool_keys=features.pool_keys)
        else:
            it = infonce_loss(features.image, features.text, scale, bias, world=self.world,
                              pool_keys=features.pool_keys)
        if not cfg.pc_active(step):
            pc = torch.zeros((), dtype=it.dtype, device=it.device)
            return {"total": it, "it": it, "pc": pc}
        if heads is None:
            raise MedclipError("PC-Align is on (pc_weight > 0) but the model has no concept heads")
        if not features.has_concepts:
            raise MedclipError("PC-Align is on at this step but the features were computed without it; "
                               "pass the step to forward_features")
        pc = pc_align_loss(features.patches, features.concepts, features.concept_mask, features.concept_ids,
                           heads.logit_scale, heads.logit_bias, cfg.pc_config(), world=self.world,
                           concept_negated=features.concept_negated)
        return {"total": it + cfg.pc_weight * pc, "it": it, "pc": pc}

    def compute(self, model, heads, batch: dict, step: int) -> dict[str, torch.Tensor]:
        """{'total', 'it', 'pc'} losses of one batch (scalars; backward on 'total')."""
        return self.losses(self.forward_features(model, heads, batch, step), step, model, heads)

    __call__ = compute
