"""Attention kernels for open_clip's native blocks: torch SDPA (fused), xformers, or plain math.

open_clip's blocks call their ``attn`` submodule, an ``nn.MultiheadAttention``, as
``attn(q, k, v, need_weights=False, attn_mask=mask)``. :func:`set_attention_backend` puts a
:class:`KernelAttention` in its place (ordinary submodule assignment) that takes over the very same
parameter objects, so state-dict keys, checkpoints and optimiser groups are unchanged, and whose
forward dispatches on its ``backend`` attribute through the :data:`KERNELS` registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from medclip.errors import MedclipError

# name -> kernel(q, k, v, bias, dropout) on [batch, length, heads, head_dim] tensors (xformers' BMHK
# layout); ``bias`` is an additive float mask broadcastable to [batch, heads, q_len, k_len], or None.
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]


def sdpa_kernel(q, k, v, bias, dropout):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout).transpose(1, 2)


def math_kernel(q, k, v, bias, dropout):
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    return (F.dropout(scores.softmax(-1), dropout) @ v).transpose(1, 2)


def xformers_kernel(q, k, v, bias, dropout):
    import xformers.ops as xops

    if bias is not None:
        bias = aligned_bias(bias, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.dtype)
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout)


KERNELS: dict[str, Kernel] = {"sdpa": sdpa_kernel, "xformers": xformers_kernel, "math": math_kernel}
BACKENDS = tuple(KERNELS)


def aligned_bias(bias: torch.Tensor, batch: int, heads: int, q_len: int, k_len: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """The mask as xformers takes a tensor bias: shape exactly [B, H, Lq, Lk], rows 16-byte aligned.

    xformers' CUTLASS kernel refuses a bias whose row stride is not a multiple of 8 elements (CLIP's
    77-token causal mask); it asks for a slice of a wider buffer. Batch and heads stay broadcast
    (stride 0), so the buffer is one [Lq, Lk] mask, or one per (batch, head) when the mask has them.
    """
    lead = bias.shape[:-2]
    width = -(-k_len // 8) * 8
    buffer = torch.zeros(*lead, q_len, width, dtype=dtype, device=bias.device)[..., :k_len]
    buffer.copy_(bias)
    return buffer.expand(batch, heads, q_len, k_len)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


class KernelAttention(nn.MultiheadAttention):
    """Self-attention with nn.MultiheadAttention's parameters and a selectable kernel."""

    backend: str = "sdpa"

    @classmethod
    def taking_over(cls, attn: nn.MultiheadAttention, backend: str) -> KernelAttention:
        """A KernelAttention holding ``attn``'s own parameter objects (built on the meta device: no copy)."""
        new = cls(attn.embed_dim, attn.num_heads, dropout=attn.dropout, bias=attn.in_proj_bias is not None,
                  batch_first=attn.batch_first, device="meta")
        new.in_proj_weight, new.in_proj_bias, new.out_proj = attn.in_proj_weight, attn.in_proj_bias, attn.out_proj
        new.backend = backend
        return new.train(attn.training)

    def forward(self, query, key, value, need_weights=False, attn_mask=None, key_padding_mask=None, **kwargs):
        if key_padding_mask is not None or need_weights:
            return super().forward(query, key, value, need_weights=need_weights, attn_mask=attn_mask,
                                   key_padding_mask=key_padding_mask, **kwargs)
        packed = query is key and key is value  # self-attention: one packed projection, fewer small matmuls
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, dim = query.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        if packed:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).view(
                batch, length, 3, heads, head_dim).unbind(2)
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = (F.linear(x, w, b).view(batch, -1, heads, head_dim)
                       for x, w, b in ((query, w_q, b_q), (key, w_k, b_k), (value, w_v, b_v)))
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        if attn_mask is not None and attn_mask.dim() == 3:  # [B * H, Lq, Lk] -> [B, H, Lq, Lk]
            attn_mask = attn_mask.view(batch, heads, length, -1)
        out = KERNELS[self.backend](q, k, v, attn_mask, self.dropout if self.training else 0.0)
        out = self.out_proj(out.reshape(batch, -1, dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _takes_kernels(module: nn.Module) -> bool:
    """Plain multi-head attention (same q/k/v width, no extra key/value biases): what the kernels compute."""
    return (isinstance(module, nn.MultiheadAttention) and module.kdim == module.embed_dim == module.vdim
            and module.bias_k is None and not module.add_zero_attn)


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every plain nn.MultiheadAttention in ``model`` to ``backend``; returns how many were switched."""
    if backend not in KERNELS:
        raise MedclipError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise MedclipError("attention backend xformers needs the 'gpu' extra: pip install 'medclip[gpu]'")
    count = 0
    for name, module in list(model.named_modules()):
        if not _takes_kernels(module):
            continue
        if isinstance(module, KernelAttention):
            module.backend = backend
        else:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, KernelAttention.taking_over(module, backend))
        count += 1
    return count
