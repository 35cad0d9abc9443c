"""Attention kernels for open_clip's native blocks: torch SDPA (fused), xformers, or plain math.

open_clip's blocks hold an ``nn.MultiheadAttention``; it is swapped in place for a subclass with
the same parameters (so state-dict keys and checkpoints are unchanged) whose forward calls the
chosen kernel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medclip.errors import MedclipError

BACKENDS = ("sdpa", "xformers", "math")


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        return False
    return True


class KernelAttention(nn.MultiheadAttention):
    """Self-attention with nn.MultiheadAttention's parameters and a selectable kernel."""

    backend: str = "sdpa"

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
        dropout = self.dropout if self.training else 0.0
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=q.dtype).masked_fill(attn_mask, float("-inf"))
        if self.backend == "xformers":
            import xformers.ops as xops

            bias = attn_mask.to(q.dtype).expand(batch, heads, length, -1) if attn_mask is not None else None
            out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout)
        else:
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, hd]
            if self.backend == "math":
                scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
                if attn_mask is not None:
                    scores = scores + attn_mask
                out = F.dropout(scores.softmax(-1), dropout) @ v
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
            out = out.transpose(1, 2)
        out = self.out_proj(out.reshape(batch, -1, dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every nn.MultiheadAttention in ``model`` to ``backend``; returns how many were switched."""
    if backend not in BACKENDS:
        raise MedclipError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "xformers" and not xformers_available():
        raise MedclipError("attention backend xformers needs the 'gpu' extra: pip install 'medclip[gpu]'")
    count = 0
    for module in model.modules():
        if isinstance(module, nn.MultiheadAttention) and module._qkv_same_embed_dim:
            module.__class__ = KernelAttention
            module.backend = backend
            count += 1
    return count
