"""Foundation: model zoo registration, load/save round trips, checkpoint forms, safety, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

import medclip
from medclip.errors import MedclipError
from medclip.models import registry
from medclip.models.registry import ASSETS_DIR

TEXTS = ["axial CT of the chest with a right lower lobe nodule", "T2 weighted MRI of the brain"]


def _images(n: int = 3, size: int = 80) -> list[Image.Image]:
    rng = torch.Generator().manual_seed(1)
    return [Image.fromarray((torch.rand(size, size + 10, 3, generator=rng) * 255).byte().numpy()) for _ in range(n)]


def test_configs_registered_with_open_clip():
    names = set(medclip.list_models())
    assert {"medclip-tiny", "medclip-tiny-bert", "medclip-vit-b16-biomedbert",
            "medclip-vit-l14-336-biomedbert", "medclip-siglip-so400m-pubmedbert"} <= names
    model = open_clip.create_model("medclip-tiny")
    assert model.visual.image_size == (64, 64)
    cfg = open_clip.get_model_config("medclip-tiny-bert")
    assert cfg["text_cfg"]["hf_model_name"] == str(ASSETS_DIR / "tiny-bert")  # placeholder resolved
    b16 = open_clip.get_model_config("medclip-vit-b16-biomedbert")
    assert b16["text_cfg"]["context_length"] == 256 and b16["text_cfg"]["hf_proj_type"] == "mlp"
    assert b16["text_cfg"]["hf_pooler_type"] == "cls_last_hidden_state_pooler"
    so400m = open_clip.get_model_config("medclip-siglip-so400m-pubmedbert")
    assert so400m["vision_cfg"]["timm_model_name"] == "vit_so400m_patch14_siglip_384"


def test_registration_writes_nothing_and_survives_open_clip_rescans(tmp_path, monkeypatch):
    """Pins registry.open_clip_table (open_clip's private architecture table) against the installed
    open_clip: what it fills is what open_clip's public functions read, and open_clip's own
    add_model_config (which rebuilds the table) keeps it."""
    monkeypatch.setenv("MEDCLIP_CACHE", str(tmp_path / "cache"))
    assert set(medclip.register_model_configs()) >= {"medclip-tiny", "medclip-tiny-bert"}
    assert registry.list_models() == sorted(registry.list_models())  # as open_clip lists its own
    assert registry.open_clip_table() is open_clip.factory._MODEL_CONFIGS
    (tmp_path / "user-arch.json").write_text(json.dumps(open_clip.get_model_config("medclip-tiny")))
    open_clip.add_model_config(tmp_path / "user-arch.json")
    assert {"medclip-tiny", "medclip-tiny-bert", "user-arch"} <= set(open_clip.list_models())
    assert open_clip.get_model_config("medclip-tiny-bert")["text_cfg"]["hf_model_name"] == str(ASSETS_DIR / "tiny-bert")
    assert open_clip.create_model("user-arch").visual.image_size == (64, 64)
    assert not (tmp_path / "cache").exists()  # in memory: no config file written


@pytest.mark.parametrize("name", ["medclip-tiny", "medclip-tiny-bert"])
def test_save_then_load_with_medclip_and_open_clip(tmp_path, name, monkeypatch):
    torch.manual_seed(0)
    encoder = medclip.load(name, device="cpu")
    images = _images()
    ref_img, ref_txt = encoder.encode_image(images), encoder.encode_text(TEXTS)
    medclip.save(encoder, tmp_path / "export")

    again = medclip.load(tmp_path / "export", device="cpu")
    torch.testing.assert_close(again.encode_image(images), ref_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(again.encode_text(TEXTS), ref_txt, atol=1e-6, rtol=0)

    # Plain open_clip, no medclip code path: its own transform and tokenizer. A tower bundled in the
    # export is named "." (relative, like every path in an export): open_clip resolves it in the cwd.
    monkeypatch.chdir(tmp_path / "export")
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
    tokenizer = open_clip.get_tokenizer("local-dir:.")
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        txt = model.encode_text(tokenizer(TEXTS), normalize=True)
    torch.testing.assert_close(img, ref_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-6, rtol=0)


def test_safetensors_and_compiled_prefix_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    source = medclip.load("medclip-tiny", device="cpu")
    sd = {"_orig_mod." + k: v.contiguous().clone() for k, v in source.model.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    loaded = medclip.load("medclip-tiny", checkpoint=tmp_path / "w.safetensors", device="cpu")
    torch.testing.assert_close(loaded.encode_text(TEXTS), source.encode_text(TEXTS), atol=1e-6, rtol=0)


def test_training_checkpoint_carries_its_config(tmp_path):
    torch.manual_seed(5)
    source = medclip.load("medclip-tiny", device="cpu")
    torch.save({"model": source.model.state_dict(), "model_cfg": source.model_cfg, "step": 7},
               tmp_path / "step_7.pt")
    loaded = medclip.load(tmp_path / "step_7.pt", device="cpu")
    torch.testing.assert_close(loaded.encode_text(TEXTS), source.encode_text(TEXTS), atol=1e-6, rtol=0)


def test_mismatched_checkpoint_is_an_error(tmp_path):
    small = medclip.load("medclip-tiny", device="cpu")
    sd = small.model.state_dict()
    sd.pop("visual.proj")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(MedclipError, match="1 missing keys .*visual.proj.*1 unexpected keys"):
        medclip.load("medclip-tiny", checkpoint=tmp_path / "partial.pt")
    loaded = medclip.load("medclip-tiny", checkpoint=tmp_path / "partial.pt", allow_mismatch=True)
    assert loaded.model.visual.proj.shape == small.model.visual.proj.shape

    torch.save(small.model.state_dict(), tmp_path / "tiny.pt")
    with pytest.raises(MedclipError, match="shape mismatches"):
        medclip.load("medclip-small", checkpoint=tmp_path / "tiny.pt")
    with pytest.raises(MedclipError, match="carries no model config"):
        medclip.load(tmp_path / "tiny.pt")


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(MedclipError, match="refusing to load"):
        medclip.load("medclip-tiny", checkpoint=tmp_path / "evil.pt")
    with pytest.raises(MedclipError, match="refusing to load"):
        medclip.load(tmp_path / "evil.pt")
    assert not marker.exists()


def test_wrong_names_and_paths_give_one_clear_error(tmp_path):
    with pytest.raises(MedclipError, match="unknown model 'medclip-nope'"):
        medclip.load("medclip-nope")
    with pytest.raises(MedclipError, match="checkpoint not found"):
        medclip.load(tmp_path / "missing.pt")
    with pytest.raises(MedclipError, match="open_clip_config.json is missing"):
        medclip.load(tmp_path)
    with pytest.raises(MedclipError, match="unknown precision"):
        medclip.load("medclip-tiny", precision="fp8")


@pytest.mark.integration
def test_hf_tower_offline_from_local_dir_and_clear_error_without_it(tmp_path):
    script = (
        "import medclip, sys\n"
        "from medclip.models.registry import ASSETS_DIR\n"
        "enc = medclip.load('medclip-vit-b16-biomedbert', hf_text_dir=ASSETS_DIR / 'tiny-bert')\n"
        "assert enc.encode_text(['pleural effusion']).shape == (1, 512)\n"
        "assert enc.model.visual.image_size == (224, 224)\n"
        "print('ok')\n"
        "medclip.load('medclip-vit-b16-biomedbert')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == "ok"
    assert "MedclipError: cannot build text tower 'microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract'" in proc.stderr
    assert "hf_text_dir" in proc.stderr.splitlines()[-1]


def test_encode_accepts_pil_paths_and_tensors(tmp_path, tiny_encoder):
    images = _images(2)
    paths = []
    for i, img in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        img.save(paths[-1])
    from_pil = tiny_encoder.encode_image(images)
    from_paths = tiny_encoder.encode_image(paths)
    from_tensor = tiny_encoder.encode_image(torch.stack([tiny_encoder.preprocess(i) for i in images]))
    torch.testing.assert_close(from_paths, from_pil)
    torch.testing.assert_close(from_tensor, from_pil)
    assert torch.allclose(from_pil.norm(dim=-1), torch.ones(2))


def _vit_by_hand(visual, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ViT written out from its weights with functional ops: (class token, patch tokens),
    both through ln_post and the projection. Independent of open_clip's forward and of medclip's towers."""
    import torch.nn.functional as F

    def norm(x, ln):
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    x = F.conv2d(images, visual.conv1.weight, stride=visual.conv1.stride).flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(len(x), 1, -1), x], dim=1) + visual.positional_embedding
    x = norm(x, visual.ln_pre)
    for block in visual.transformer.resblocks:
        attn = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        q, k, v = F.linear(norm(x, block.ln_1), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(len(x), -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / (width // heads) ** 0.5, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(len(x), -1, width)
        x = x + F.linear(mixed, attn.out_proj.weight, attn.out_proj.bias)
        hidden = F.gelu(F.linear(norm(x, block.ln_2), block.mlp.c_fc.weight, block.mlp.c_fc.bias))
        x = x + F.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias)
    x = norm(x, visual.ln_post) @ visual.proj
    return x[:, 0], x[:, 1:]


def test_patch_embeddings_are_in_the_joint_space(tiny_encoder):
    images = _images(2)
    patches = tiny_encoder.patch_embeddings(images)
    assert patches.shape == (2, 64, tiny_encoder.embed_dim)
    assert tiny_encoder.grid_size == (8, 8)
    with torch.no_grad():
        batch = torch.stack([tiny_encoder.preprocess(i) for i in images])
        pooled, by_hand = _vit_by_hand(tiny_encoder.model.visual, batch)
        torch.testing.assert_close(pooled, tiny_encoder.model.encode_image(batch), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches, by_hand, atol=1e-5, rtol=0)


def test_text_token_states_align_with_ids(tiny_encoder, tiny_bert_encoder):
    from medclip.models import towers
    for enc in (tiny_encoder, tiny_bert_encoder):
        ids = enc.tokenize(TEXTS)
        with torch.no_grad():
            pooled, states = towers.text_tokens(enc.model, ids)
            torch.testing.assert_close(pooled, enc.model.encode_text(ids))
        assert states.shape[:2] == ids.shape


@pytest.mark.parametrize("custom_text", [False, True], ids=["CLIP", "CustomTextCLIP"])
def test_native_text_states_are_open_clips_own(custom_text):
    """towers.text_tokens on open_clip's native text towers, pinned against the installed open_clip: the
    pooled features are encode_text's, the states are the tokens its text forward returns (CustomTextCLIP's
    output_tokens) and, for CLIP, the state at the end-of-text position projects to the pooled features."""
    from medclip.models import towers

    torch.manual_seed(0)
    medclip.register_model_configs()
    model = open_clip.create_model("medclip-tiny", force_custom_text=custom_text).eval()
    ids = open_clip.get_tokenizer("medclip-tiny")(TEXTS)
    with torch.no_grad():
        pooled, states = towers.text_tokens(model, ids)
        short_pooled, short_states = towers.text_tokens(model, ids[:, :20])  # names: fewer ids than the context
        torch.testing.assert_close(pooled, model.encode_text(ids), atol=1e-6, rtol=0)
        if custom_text:
            model.text.output_tokens = True
            torch.testing.assert_close(states, model.text(ids)[1], atol=1e-6, rtol=0)
        else:
            at_end = states[torch.arange(len(ids)), ids.argmax(dim=-1)]
            torch.testing.assert_close(at_end @ model.text_projection, pooled, atol=1e-6, rtol=0)
    assert states.shape == (len(TEXTS), ids.shape[1], towers.text_width(model))
    torch.testing.assert_close(short_states, states[:, :20], atol=1e-6, rtol=0)  # causal: real positions unchanged


def test_cli_info_lists_models():
    proc = subprocess.run([sys.executable, "-m", "medclip", "info"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "medclip-tiny" in proc.stdout and "torch" in proc.stdout


def test_shipped_tokenizer_assets_are_small_and_complete():
    tiny = Path(ASSETS_DIR / "tiny-bert")
    assert {"config.json", "vocab.txt", "tokenizer_config.json"} <= {p.name for p in tiny.iterdir()}
    assert sum(p.stat().st_size for p in tiny.iterdir()) < 200_000
