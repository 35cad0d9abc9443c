"""Attention backends wired into open_clip's blocks: the xformers adapter's layout and mask handling
(checked against a stand-in that enforces xformers' input contract), and how the kernels are put in."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import medclip
from medclip.models.loading import build_model, resolve_config
from medclip.training.attention import KernelAttention, set_attention_backend


class XformersStandIn:
    """``xformers.ops.memory_efficient_attention`` as its CUDA kernels check their inputs (xformers
    0.0.2x `fmha.common.Inputs.validate_inputs` and CUTLASS `_check_bias_alignment`), computed with SDPA."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, query, key, value, attn_bias=None, p=0.0, scale=None, op=None):
        assert query.ndim == key.ndim == value.ndim == 4, "BMHK layout expected"
        assert query.dtype == key.dtype == value.dtype and query.device == key.device == value.device
        batch, q_len, heads, head_dim = query.shape
        assert key.shape[0] == batch and key.shape[2] == heads and value.shape[:3] == key.shape[:3]
        if attn_bias is not None:
            expected = (batch, heads, q_len, key.shape[1])
            if tuple(attn_bias.shape) != expected:
                raise ValueError(f"Invalid shape for attention bias: {attn_bias.shape} (expected {expected})")
            alignment = 128 // torch.finfo(attn_bias.dtype).bits
            if any(attn_bias.stride(d) % alignment for d in range(attn_bias.ndim - 1)) or attn_bias.stride(-1) > 1:
                raise NotImplementedError(f"`cutlassF` is not supported because: attn_bias.stride(-2) % {alignment}"
                                          f" != 0 (attn_bias.stride() = {attn_bias.stride()})")
            assert attn_bias.dtype == query.dtype
        self.calls.append({"q": tuple(query.shape), "bias": None if attn_bias is None else tuple(attn_bias.shape)})
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=attn_bias, dropout_p=p, scale=scale)
        return out.transpose(1, 2)


@pytest.fixture
def xformers_stand_in(monkeypatch):
    kernel = XformersStandIn()
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = kernel
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return kernel


def clip_77_tokens():
    """medclip-tiny with CLIP's 77-token causal text mask (a row stride xformers cannot take as is)."""
    cfg = resolve_config("medclip-tiny")
    cfg["text_cfg"] = {**cfg["text_cfg"], "context_length": 77}
    torch.manual_seed(0)
    return build_model(cfg, torch.device("cpu"), "fp32")


def test_xformers_adapter_layout_and_causal_mask_match_sdpa(xformers_stand_in):
    reference, model = clip_77_tokens(), clip_77_tokens()
    assert set_attention_backend(reference, "sdpa") == set_attention_backend(model, "xformers") == 6
    images, text = torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, 77))
    out, ref = model(images, text), reference(images, text)
    for got, want in zip(out[:2], ref[:2]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (out[0].sum() + out[1].square().sum()).backward()
    (ref[0].sum() + ref[1].square().sum()).backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, param in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
    # Vision blocks pass no mask; text blocks pass the causal one as a [B, H, 77, 77] bias (4 heads).
    assert {c["bias"] for c in xformers_stand_in.calls} == {None, (2, 4, 77, 77)}
    assert {c["q"] for c in xformers_stand_in.calls} == {(2, 65, 4, 32), (2, 77, 4, 32)}


def test_xformers_adapter_takes_boolean_and_per_head_masks(xformers_stand_in):
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    kernel = KernelAttention.taking_over(attn, "xformers")
    x = torch.randn(3, 13, 32)
    for mask in (torch.rand(13, 13) > 0.7, torch.randn(3 * 4, 13, 13)):
        mask = mask.fill_diagonal_(False) if mask.dtype == torch.bool else mask  # no fully masked row
        want, _ = attn(x, x, x, attn_mask=mask, need_weights=False)
        got, _ = kernel(x, x, x, attn_mask=mask, need_weights=False)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_switching_kernels_keeps_parameters_and_leaves_other_objects_alone():
    torch.manual_seed(0)
    model = medclip.load("medclip-tiny").model
    original = model.visual.transformer.resblocks[0].attn
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    rng = torch.get_rng_state()
    assert set_attention_backend(model, "math") == 6
    assert type(original) is nn.MultiheadAttention  # the old module object is not mutated in place
    swapped = model.visual.transformer.resblocks[0].attn
    assert type(swapped) is KernelAttention and swapped.in_proj_weight is original.in_proj_weight
    assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects: optimiser-safe
    assert list(model.state_dict()) == keys and torch.equal(torch.get_rng_state(), rng)
    assert set_attention_backend(model, "sdpa") == 6 and swapped.backend == "sdpa"  # switched again in place
