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
    with pytest.warns(medclip.RandomWeightsWarning, match="medclip-tiny: no checkpoint given") as caught:
        model, train, val = medclip.create_model_and_transforms("medclip-tiny")
    # pointed at the user's line, not at medclip's internals
    assert [w.filename for w in caught if w.category is medclip.RandomWeightsWarning] == [__file__]
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
    with pytest.warns(medclip.RandomWeightsWarning) as caught:
        encoder = medclip.load("medclip-tiny")
    assert [w.filename for w in caught if w.category is medclip.RandomWeightsWarning] == [__file__]
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


PLAIN_OPEN_CLIP_HERE = """
import sys, torch, open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
tokenizer = open_clip.get_tokenizer("local-dir:.")
ref = torch.load(sys.argv[1])
with torch.no_grad():
    text = model.eval().encode_text(tokenizer(ref["texts"]), normalize=True)
    image = model.encode_image(ref["pixels"], normalize=True)
torch.testing.assert_close(text, ref["text"], atol=1e-6, rtol=0)
torch.testing.assert_close(image, ref["image"], atol=1e-6, rtol=0)
assert not [m for m in sys.modules if m.split(".")[0] == "medclip"]
print("ok")
"""


def _json_strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)
    elif isinstance(value, str):
        yield value


def test_export_is_self_contained_and_loads_elsewhere_with_plain_open_clip(tmp_path):
    import json
    import os
    import shutil
    import subprocess
    import sys

    from medclip.models.registry import ASSETS_DIR

    tower = shutil.copytree(ASSETS_DIR / "tiny-bert", tmp_path / "source-env" / "tiny-bert")
    with pytest.warns(medclip.RandomWeightsWarning):
        encoder = medclip.load("medclip-tiny-bert", hf_text_dir=tower, device="cpu")
    export = medclip.save(encoder, tmp_path / "source-env" / "export")
    for path in export.rglob("*.json"):
        absolute = [s for s in _json_strings(json.loads(path.read_text())) if s.startswith(("/", "~")) or "tmp" in s]
        assert not absolute, f"{path.name} names {absolute}"
    texts = ["pleural effusion", "a normal chest x-ray"]
    pixels = torch.rand(2, 3, 64, 64)
    expected = {"texts": texts, "pixels": pixels, "text": encoder.encode_text(texts), "image": encoder.encode_image(pixels)}
    # Another machine: the export copied elsewhere, the source environment (its HF tower dir) gone.
    moved = shutil.copytree(export, tmp_path / "other-machine" / "model")
    shutil.rmtree(tmp_path / "source-env")
    torch.save(expected, tmp_path / "expected.pt")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"))
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP_HERE, str(tmp_path / "expected.pt")], cwd=moved,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    again = medclip.load(moved, device="cpu")
    torch.testing.assert_close(again.encode_text(texts), expected["text"], atol=1e-6, rtol=0)
    torch.testing.assert_close(again.encode_image(pixels), expected["image"], atol=1e-6, rtol=0)


def test_info_lists_the_pretrained_entries_with_licence_and_citation():
    from medclip.info import pretrained_lines

    text = "\n".join(pretrained_lines())
    for name, _ in medclip.list_pretrained():
        assert f"{name} " in text
    assert "https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in text
    assert "https://huggingface.co/datasets/axiong/pmc_oa_beta/blob/main/checkpoint.pt" in text
    assert "licence: CC BY-NC 4.0" in text and "arXiv:2412.10372" in text and "(gated)" in text
