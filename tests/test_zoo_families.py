"""Every public family through medclip.load, proven equal to its original forward pass.

For each family the test rebuilds the original model's forward pass as its authors wrote it (read
from their public code; written here from those facts, not copied) at reduced width and depth with
every structural feature kept, gives it random weights, saves it exactly as the family publishes it
(file names, key names, wrappers, config files), loads it with ``medclip.load(NAME, checkpoint=...)``
and checks equal image and text embeddings (atol 1e-5) and the same preprocessing (image size,
resize mode, mean/std, tokenizer, context length, padding). MedSigLIP's reference is transformers'
own ``SiglipModel``; BiomedCLIP's is open_clip's own hub loading.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image
from test_zoo_originals import (  # tests/ is on sys.path under pytest
    ATOL,
    TEXTS,
    assert_same_embeddings,
    sample_images,
)
from test_zoo_published import (
    CONCEPTS,
    PUBLISHERS,
    conceptclip_reference_scores,
    reference_features,
    with_tokenizer_beside,
)

import medclip
from medclip.errors import MedclipError
from medclip.models.registry import ASSETS_DIR


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """name -> (reference model, published checkpoint path, load kwargs)."""
    root = tmp_path_factory.mktemp("published")
    return {name: make(root) for name, make in PUBLISHERS.items()}



@pytest.mark.parametrize("name", list(PUBLISHERS))
def test_family_loads_equal_to_its_original(published, name):
    ref, path, kwargs = published[name]
    encoder = medclip.load(name, checkpoint=path, device="cpu", **kwargs)
    images = sample_images()
    ref_img, ref_txt, ref_pixels, ref_ids = reference_features(name, ref, path, images, TEXTS)
    pixels = torch.stack([encoder.preprocess(im) for im in images])
    ids = encoder.tokenize(TEXTS)
    # Preprocessing: same pixels (size, resize mode, interpolation, mean/std) and same token ids
    # (tokenizer, context length, padding).
    assert pixels.shape == ref_pixels.shape
    torch.testing.assert_close(pixels, ref_pixels, atol=1e-5, rtol=0)
    assert torch.equal(ids, ref_ids)
    image_diff = assert_same_embeddings(encoder.encode_image(ref_pixels, normalize=False), ref_img)
    text_diff = assert_same_embeddings(encoder.encode_text(TEXTS, normalize=False), ref_txt)
    print(f"{name}: max |image diff| {image_diff:.2e}, max |text diff| {text_diff:.2e}, "
          f"pixels {tuple(pixels.shape[1:])}, context {ids.shape[1]}")


def test_conceptclip_heads_score_patches_like_the_original(published, tmp_path, capsys):
    from medclip.cli import main
    from medclip.concepts.scoring import ConceptScorer

    ref, path, kwargs = published["conceptclip"]
    encoder = medclip.load("conceptclip", checkpoint=path, device="cpu", **kwargs)
    assert encoder.heads is not None and encoder.heads.config.concept_head_on_tokens
    images = sample_images()
    expected = conceptclip_reference_scores(ref, path.parent, images)
    scorer = ConceptScorer(encoder)
    assert scorer.method == "pc_align"
    image_scores, patch_scores = scorer.score(images, CONCEPTS)
    assert patch_scores.shape == expected.shape == (2, 3, 9)
    torch.testing.assert_close(patch_scores, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(image_scores, expected.max(-1).values, atol=ATOL, rtol=0)

    # The commands a user runs, on ConceptCLIP's own checkpoint with its concept scale and bias.
    image_path = tmp_path / "scan.png"
    images[0].save(image_path)
    model_args = ["--model", "conceptclip", "--checkpoint", str(path), "--hf-text-dir", str(kwargs["hf_text_dir"]),
                  "--device", "cpu", "--concepts", ",".join(CONCEPTS)]
    assert main(["concepts", "zero-shot", str(image_path), *model_args, "--top-k", "3"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    by_name = {c["name"]: c["score"] for c in row["concepts"]}
    want = conceptclip_reference_scores(ref, path.parent, [Image.open(image_path)])[0].max(-1).values
    assert by_name == pytest.approx(dict(zip(CONCEPTS, want.tolist())), abs=1e-4)
    assert main(["explain", str(image_path), *model_args, "-o", str(tmp_path / "maps.png")]) == 0
    out = capsys.readouterr().out
    shown = json.loads(out[out.index("{"):])
    assert shown["method"] == "pc_align" and (tmp_path / "maps.png").stat().st_size > 0
    assert {c["name"]: c["score"] for c in shown["concepts"]} == pytest.approx(dict(zip(CONCEPTS, want.tolist())),
                                                                              abs=1e-4)


# Plain open_clip, nothing of medclip imported: each converted directory from inside it (exports name
# their bundled towers relative to themselves), open_clip's own transform and tokenizer.
PLAIN_OPEN_CLIP = textwrap.dedent("""
    import json, os, sys
    import torch
    import open_clip
    from PIL import Image

    texts, images = json.loads(sys.argv[1]), [Image.open(p) for p in sys.argv[2].split(",")]
    for directory in sys.argv[3:]:
        os.chdir(directory)
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:.")
        tokenizer = open_clip.get_tokenizer("local-dir:.")
        with torch.no_grad():
            pixels, ids = torch.stack([preprocess(im) for im in images]), tokenizer(texts)
            torch.save({"image": model.eval().encode_image(pixels), "text": model.encode_text(ids),
                        "pixels": pixels, "ids": ids}, "plain_open_clip.pt")
    assert not [m for m in sys.modules if m.split(".")[0] == "medclip"], "medclip was imported"
    print("ok")
""")


def test_convert_writes_each_family_for_plain_open_clip(published, tmp_path, capsys):
    from medclip.cli import main

    outs = {}
    for name, (_, path, kwargs) in published.items():
        outs[name] = tmp_path / name
        extra = ["--hf-text-dir", str(kwargs["hf_text_dir"])] if "hf_text_dir" in kwargs else []
        assert main(["convert", f"{name}={path}", str(outs[name]), *extra]) == 0
        assert "open_clip.create_model_and_transforms" in capsys.readouterr().out
    images = sample_images()
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, json.dumps(TEXTS), ",".join(paths),
                           *map(str, outs.values())], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    for name, out in outs.items():
        ref, path, _ = published[name]
        ref_img, ref_txt, ref_pixels, ref_ids = reference_features(name, ref, path, images, TEXTS)
        got = torch.load(out / "plain_open_clip.pt")
        torch.testing.assert_close(got["pixels"], ref_pixels, atol=1e-5, rtol=0)
        assert torch.equal(got["ids"], ref_ids), name
        image_diff, text_diff = assert_same_embeddings(got["image"], ref_img), assert_same_embeddings(got["text"], ref_txt)
        print(f"{name} via medclip convert + plain open_clip: max |image diff| {image_diff:.2e}, "
              f"max |text diff| {text_diff:.2e}")


def _one_line_error(call, *needles: str) -> str:
    with pytest.raises(MedclipError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_wrong_checkpoints_name_the_family_and_the_first_unmatched_keys(published, tmp_path):
    unimed_path, pmc_path = published["unimed-clip-b16"][1], published["pmc-clip"][1]
    bert = str(published["unimed-clip-b16"][2]["hf_text_dir"])
    # A checkpoint of another family.
    _one_line_error(lambda: medclip.load("pmc-clip", checkpoint=unimed_path, hf_text_dir=bert),
                    "pmc-clip:", "is not a PMC-CLIP checkpoint", "looks like a UniMed-CLIP checkpoint",
                    "missing visual.attnpool.c_proj.weight", "did not match: visual.class_embedding")
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=published["conceptclip"][1]),
                    "not a UniMed-CLIP checkpoint", "looks like a ConceptCLIP checkpoint",
                    "did not match: logit_bias, concept_logit_scale")
    _one_line_error(lambda: medclip.load("medsiglip-448", checkpoint=published["biomedclip"][1]),
                    "medsiglip-448:", "config.json")
    _one_line_error(lambda: medclip.load(pmc_path), "looks like a PMC-CLIP checkpoint",
                    f"medclip.load('pmc-clip', checkpoint='{pmc_path}')")
    # A snapshot with a file missing.
    for name, drop in (("medsiglip-448", "model.safetensors"), ("biomedclip", "open_clip_pytorch_model.bin")):
        broken = tmp_path / f"{name}-broken"
        shutil.copytree(published[name][1], broken)
        (broken / drop).unlink()
        _one_line_error(lambda n=name, b=broken: medclip.load(n, checkpoint=b), f"{name}:", "has no weights", drop)
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=tmp_path), "unimed-clip-b16:",
                    "unimed-clip-vit-b16.pt")
    # Shapes that do not fit: a text tower config of another size.
    _one_line_error(lambda: medclip.load("unimed-clip-b16", checkpoint=unimed_path,
                                         hf_text_dir=ASSETS_DIR / "tiny-bert"),
                    "unimed-clip-b16 (UniMed-CLIP):", "does not fit the architecture", "shape mismatches",
                    "text.transformer.encoder.layer.0.intermediate.dense.weight (256, 128) vs model (512, 128)")


def test_one_eval_suite_command_compares_families(published, tmp_path):
    from conftest import require_shared

    from medclip.cli import main
    from medclip.evaluation.report import read_results

    require_shared("medpix", "dev.jsonl")
    bert = published["unimed-clip-b16"][2]["hf_text_dir"]
    unimed = with_tokenizer_beside(published["unimed-clip-b16"][1], bert, tmp_path / "unimed")
    pmc = with_tokenizer_beside(published["pmc-clip"][1], bert, tmp_path / "pmc")
    out = tmp_path / "compare"
    assert main(["eval", "suite", "shared_real", "--datasets", "medpix_modality", "--model", f"unimed-clip-b16={unimed}",
                 "--model", f"biomedclip={published['biomedclip'][1]}", "--model", f"pmc-clip={pmc}",
                 "--out", str(out), "--workers", "0", "--no-plots", "--no-progress", "--device", "cpu"]) == 0
    rows = (out / "summary.md").read_text().splitlines()
    assert rows[0].startswith("| model | medpix_modality [mean_per_class_recall]")
    assert sorted(r.split("|")[1].strip() for r in rows[2:] if r.startswith("| ")) == \
        ["biomedclip", "pmc-clip", "unimed-clip-b16"]
    assert {r["model"] for r in read_results(out)} == {"biomedclip", "pmc-clip", "unimed-clip-b16"}
    assert all(r["n_samples"] > 100 for r in read_results(out))


def test_open_clip_entry_points_take_a_family_checkpoint(published):
    import open_clip

    ref, path, kwargs = published["unimed-clip-b16"]
    model, train, val = medclip.create_model_and_transforms("unimed-clip-b16", pretrained=str(path), **kwargs)
    assert isinstance(model, open_clip.model.CustomTextCLIP) and model.visual.image_size == (32, 32)
    tokenizer = medclip.get_tokenizer("unimed-clip-b16", **kwargs)
    image = sample_images(1)
    ref_img, ref_txt, _, _ = reference_features("unimed-clip-b16", ref, path, image, TEXTS)
    with torch.no_grad():
        assert_same_embeddings(model.encode_image(torch.stack([val(im) for im in image])), ref_img)
        assert_same_embeddings(model.encode_text(tokenizer(TEXTS)), ref_txt)
    assert tokenizer(TEXTS).shape == (3, 256)


def test_unimed_checkpoint_also_loads_into_an_architecture_by_name(published, tmp_path):
    """The checkpoint form `medclip.load(ARCH, checkpoint=unimed.pt)` (text_encoder.* keys, {"state_dict"},
    module. prefix), with the architecture registered as an open_clip config."""
    import open_clip

    from medclip.models import families, pretrained

    ref, path, kwargs = published["unimed-clip-b16"]
    model_cfg = families.get("unimed").read(path, pretrained.get("unimed-clip-b16"), kwargs["hf_text_dir"]).model_cfg
    (tmp_path / "unimed-reduced-arch.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "unimed-reduced-arch.json")
    encoder = medclip.load("unimed-reduced-arch", checkpoint=path, device="cpu")
    ref_img, ref_txt, pixels, _ = reference_features("unimed-clip-b16", ref, path, sample_images(), TEXTS)
    assert_same_embeddings(encoder.encode_image(pixels), ref_img)
    assert_same_embeddings(encoder.encode_text(TEXTS), ref_txt)


def test_named_models_are_fetched_from_where_they_are_published(published, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_file(repo_id, filename, repo_type=None, **_):
        calls.append((repo_id, filename, repo_type))
        return str(published["pmc-clip"][1])

    def fake_snapshot(repo_id, repo_type=None, **_):
        calls.append((repo_id, None, repo_type))
        return str(published["medsiglip-448"][1])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_file)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    assert medclip.load("pmc-clip", device="cpu", **published["pmc-clip"][2]).name == "pmc-clip"
    assert medclip.load("medsiglip-448", device="cpu").embed_dim == 48
    assert calls == [("axiong/pmc_oa_beta", "checkpoint.pt", "dataset"), ("google/medsiglip-448", None, "model")]

    def offline(*_, **__):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file.\nCheck your connection.")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    _one_line_error(lambda: medclip.load("unimed-clip-b16"), "cannot fetch unimed-clip-b16 from "
                    "https://huggingface.co/UzairK/unimed-clip-vit-b16/blob/main/unimed-clip-vit-b16.pt",
                    "medclip.load('unimed-clip-b16', checkpoint=PATH)")
    _one_line_error(lambda: medclip.load("conceptclip"), "(gated: accept its terms")


def test_shipped_conceptclip_shape_config_is_the_shape_conceptclip_loads_as(published):
    """medclip-siglip-so400m-pubmedbert is sold as ConceptCLIP's shape: its towers, pooling and
    projection must be those the conceptclip reader builds from ConceptCLIP's own checkpoint (the fork
    mean-pools its text: its config names no pooler, so the dataclass default applies)."""
    import open_clip

    from medclip.models import families, pretrained

    ref, path, kwargs = published["conceptclip"]
    read = families.get("conceptclip").read(path, pretrained.get("conceptclip"), kwargs["hf_text_dir"]).model_cfg
    medclip.register_model_configs()
    shipped = open_clip.get_model_config("medclip-siglip-so400m-pubmedbert")
    for key in ("hf_proj_type", "hf_pooler_type", "context_length"):
        assert shipped["text_cfg"][key] == read["text_cfg"][key], key
    for key in ("timm_pool", "timm_proj"):
        assert shipped["vision_cfg"][key] == read["vision_cfg"][key], key
    assert shipped["vision_cfg"]["timm_model_name"] == "vit_so400m_patch14_siglip_384"
    assert shipped["init_logit_bias"] == read["init_logit_bias"] and shipped["custom_text"] == read["custom_text"]


def test_each_family_goes_through_lora_merge_and_plain_open_clip(published, tmp_path):
    """LoRA on each family's stand-in as fine-tuning puts it (adapters on both towers, trained: random B),
    merged as the export merges (``merged_for_export``), saved, and loaded by plain open_clip in a process
    without medclip: strict keys and the adapted model's embeddings."""
    from medclip.training.config import LoraConfig
    from medclip.training.lora import add_adapters, merged_for_export

    cfg = LoraConfig(rank=2, alpha=4.0)
    images, outs, adapted = sample_images(), {}, {}
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    for name, (_, path, kwargs) in published.items():
        encoder = medclip.load(name, checkpoint=path, device="cpu", **kwargs)
        pixels = torch.stack([encoder.preprocess(im) for im in images])
        with torch.no_grad():
            before = encoder.encode_image(pixels, normalize=False), encoder.encode_text(TEXTS, normalize=False)
        names = add_adapters(encoder.model, cfg)
        assert any(n.startswith("visual.") for n in names) and any(not n.startswith("visual.") for n in names), name
        generator = torch.Generator().manual_seed(0)
        for key, param in encoder.model.named_parameters():
            if "lora_B" in key:  # zero at init: give the adapters an update to merge
                param.data.copy_(torch.randn(param.shape, generator=generator) * 0.05)
        with torch.no_grad():
            adapted[name] = encoder.encode_image(pixels, normalize=False), encoder.encode_text(TEXTS, normalize=False)
        for was, now in zip(before, adapted[name]):
            assert (was - now).abs().max() > 1e-3, f"{name}: the adapters changed nothing"
        merged = merged_for_export(encoder.model_cfg, encoder.model.state_dict(), cfg)
        plain = medclip.load(name, checkpoint=path, device="cpu", **kwargs)
        plain.model.load_state_dict(merged)  # strict: the plain model's keys exactly
        outs[name] = medclip.save(plain, tmp_path / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, json.dumps(TEXTS), ",".join(paths),
                           *map(str, outs.values())], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    for name, out in outs.items():
        got = torch.load(out / "plain_open_clip.pt")
        image_diff = assert_same_embeddings(got["image"], adapted[name][0])
        text_diff = assert_same_embeddings(got["text"], adapted[name][1])
        print(f"{name} LoRA-merged in plain open_clip: max |image diff| {image_diff:.2e}, |text diff| {text_diff:.2e}")


def test_a_fine_tuning_recipe_starts_from_a_zoo_snapshot(published, tmp_path, capsys):
    """`model.checkpoint=NAME=PATH` (a zoo model's local snapshot, as `medclip eval --model` takes it) through
    `medclip pretrain --config finetune_lora`: the run starts from those weights, and the export merges the
    adapters into them; weights of another architecture than model.name stop with one line."""
    import open_clip

    from medclip.cli import main
    from medclip.models import families, pretrained

    ref, path, kwargs = published["unimed-clip-b16"]
    model_cfg = families.get("unimed").read(path, pretrained.get("unimed-clip-b16"), kwargs["hf_text_dir"]).model_cfg
    (tmp_path / "unimed-reduced-ft.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(tmp_path / "unimed-reduced-ft.json")
    out = tmp_path / "run"
    args = ["pretrain", "--config", "finetune_lora", "--set", "model.name=unimed-reduced-ft",
            "--set", f"model.checkpoint=unimed-clip-b16={path}", "--set", f"model.hf_text_dir={kwargs['hf_text_dir']}",
            "--set", "data.build=[]", "--set", "data.demo=true", "--set", "data.demo_train_samples=32",
            "--set", "data.demo_val_samples=8", "--set", "data.batch_size=8", "--set", "data.num_workers=2",
            "--set", "eval.suites=[]", "--set", "run.steps=1", "--set", "model.lora.rank=2",
            "--set", "run.progress=false", "--set", "run.tensorboard=false", "--set", f"run.output_dir={out}"]
    assert main(args) == 0
    start = medclip.load("unimed-clip-b16", checkpoint=path, device="cpu", **kwargs).model.state_dict()
    exported = medclip.load(out / "export", device="cpu", **kwargs).model.state_dict()
    assert exported.keys() == start.keys()
    untouched = [k for k in start if torch.equal(start[k], exported[k])]
    assert "visual.conv1.weight" in untouched  # not adapted: the start's own weights
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in untouched  # adapted and merged
    capsys.readouterr()
    assert main([*args[:-1], f"run.output_dir={tmp_path / 'other'}", "--set", "model.name=medclip-tiny",
                 "--set", "model.hf_text_dir="]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"medclip: error: model.checkpoint for model.name medclip-tiny: checkpoint from "
                           f"unimed-clip-b16={path} does not fit the architecture")
