"""medclip's public API in open_clip's conventions, its warnings and docstrings, and tower helpers."""

from __future__ import annotations

import warnings

import torch

import medclip
from medclip.models import towers


def test_grad_checkpointing_helper_uses_current_apis_without_deprecation_warnings():
    model = medclip.load("medclip-tiny-bert").model.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        towers.set_grad_checkpointing(model)
        assert towers.is_grad_checkpointing(model)
        assert model.visual.transformer.grad_checkpointing
        ids = torch.randint(5, 100, (2, 16))
        loss = model.encode_text(ids).sum() + model.encode_image(torch.randn(2, 3, 64, 64)).sum()
        loss.backward()
        towers.set_grad_checkpointing(model, False)
        assert not towers.is_grad_checkpointing(model)
    assert all(p.grad is not None for p in model.text.transformer.encoder.parameters())
