"""medclip's public API in open_clip's conventions, its warnings and docstrings, and tower helpers."""

from __future__ import annotations

import warnings

import pytest
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


def test_open_clip_entry_points_have_open_clip_shapes(tmp_path):
    import inspect

    import open_clip
    from PIL import Image

    image = Image.fromarray((torch.rand(40, 52, 3) * 255).byte().numpy())
    with pytest.warns(medclip.RandomWeightsWarning, match="medclip-tiny: no checkpoint given"):
        model, train, val = medclip.create_model_and_transforms("medclip-tiny")
    ref_model, ref_train, ref_val = open_clip.create_model_and_transforms("medclip-tiny")
    assert type(model) is type(ref_model) and type(train) is type(ref_train)
    assert [type(t) for t in train.transforms] == [type(t) for t in ref_train.transforms]
    torch.testing.assert_close(val(image), ref_val(image))
    assert torch.equal(medclip.get_tokenizer("medclip-tiny")(["a chest x-ray"]),
                       open_clip.get_tokenizer("medclip-tiny")(["a chest x-ray"]))
    assert medclip.get_tokenizer("medclip-tiny", context_length=16)(["a"]).shape == (1, 16)
    for ours, theirs in ((medclip.create_model_and_transforms, open_clip.create_model_and_transforms),
                         (medclip.create_model, open_clip.create_model), (medclip.get_tokenizer, open_clip.get_tokenizer)):
        assert list(inspect.signature(ours).parameters)[:2] == list(inspect.signature(theirs).parameters)[:2]

    # pretrained= a weights file: loaded, no random-weights warning, open_clip's output_dict honoured.
    torch.save(ref_model.state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", medclip.RandomWeightsWarning)
        loaded = medclip.create_model("medclip-tiny", pretrained=str(tmp_path / "w.pt"), output_dict=True)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ref_model.state_dict().values()))
    assert loaded.output_dict is True
    with pytest.raises(medclip.MedclipError, match="not a file or directory"):
        medclip.create_model("medclip-tiny", pretrained="laion2b")

    pairs = medclip.list_pretrained()
    assert ("unimed-clip-b16", "UzairK/unimed-clip-vit-b16") in pairs and "biomedclip" in dict(pairs)
    assert "medsiglip-448:google/medsiglip-448" in medclip.list_pretrained(as_str=True)
    assert {"medclip-tiny", "conceptclip", "pmc-clip"} <= set(medclip.list_models())


def test_random_weights_are_announced_and_checkpoints_are_not(tmp_path):
    with pytest.warns(medclip.RandomWeightsWarning):
        encoder = medclip.load("medclip-tiny")
    torch.save(encoder.model.state_dict(), tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error", medclip.RandomWeightsWarning)
        medclip.load("medclip-tiny", checkpoint=tmp_path / "w.pt")


def test_public_api_docstrings_stand_alone():
    import inspect

    for name in medclip.__all__:
        obj = getattr(medclip, name)
        if callable(obj):
            assert len(inspect.getdoc(obj) or "") > 40, f"medclip.{name} has no usable docstring"
    for func in (medclip.load, medclip.create_model_and_transforms):
        doc = inspect.getdoc(func)
        for parameter in inspect.signature(func).parameters:
            assert parameter in doc, f"{func.__name__} does not explain {parameter}"
    assert "medclip.list_pretrained()" in inspect.getdoc(medclip.load)
