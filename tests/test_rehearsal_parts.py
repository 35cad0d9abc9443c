"""The rehearsal's parts: debug models from the declared flavours, stand-in data in each manifest's format."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT  # tests/ is on sys.path under pytest

from medclip.data.manifest import check_manifest, load_manifest
from medclip.errors import MedclipError
from medclip.models.loading import build_model, resolve_config
from medclip.training.config import load_recipe
from medclip.training.rehearsal.data import prepare_source, shard_format, stand_in_pool
from medclip.training.rehearsal.model import TIMM_DEBUG_FLAVOURS, derive_debug_model, trunk_family

MANIFESTS = REPO_ROOT / "datasets_manifests"


def _timm_config(name: str, pool: str, proj: str) -> dict:
    return {"embed_dim": 512, "vision_cfg": {"timm_model_name": name, "timm_pool": pool, "timm_proj": proj,
                                             "image_size": 224},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}}


@pytest.mark.parametrize("name, pool, proj, debug", [
    # Same family, different names: both SigLIP towers (MAP attention pool, no class token) -> test_vit3.
    ("vit_so400m_patch14_siglip_384", "map", "none", "test_vit3"),
    ("vit_base_patch16_siglip_224", "map", "none", "test_vit3"),
    # A name sharing "vit_base" with the one above, but a class-token ViT: a different debug trunk.
    ("vit_base_patch16_224", "token", "linear", "test_vit"),
    ("resnet50", "avg", "linear", "test_resnet"),
])
def test_debug_timm_tower_follows_the_structure_not_the_name(name, pool, proj, debug):
    model = derive_debug_model(_timm_config(name, pool, proj))
    vision = model.config["vision_cfg"]
    assert vision["timm_model_name"] == debug
    assert (vision["timm_pool"], vision["timm_proj"]) == (pool, proj)  # pooling and projection kinds kept
    built = build_model(model.config)
    images = torch.zeros(2, 3, vision["image_size"], vision["image_size"])
    assert built.encode_image(images).shape == (2, model.config["embed_dim"])


@pytest.mark.parametrize("family", sorted(TIMM_DEBUG_FLAVOURS), ids=lambda f: "-".join(f))
def test_declared_timm_debug_flavours_are_what_timm_builds(family):
    """Each declared flavour is a timm architecture of its family, with the declared input side and width."""
    import timm

    flavour = TIMM_DEBUG_FLAVOURS[family]
    with torch.device("meta"):
        trunk = timm.create_model(flavour.architecture, pretrained=False)
    cls, pool = trunk_family(trunk)
    assert cls == family[0] and family[1] in ("*", pool)
    patch_embed = getattr(trunk, "patch_embed", None)
    fixed = int(patch_embed.img_size[0]) if getattr(patch_embed, "strict_img_size", False) else 0
    assert (fixed, trunk.num_features) == (flavour.image_size, flavour.width)


def test_a_timm_family_without_a_declared_flavour_is_one_clear_error():
    with pytest.raises(MedclipError, match="no debug flavour declared for timm Eva trunks .*TIMM_DEBUG_FLAVOURS"):
        derive_debug_model(_timm_config("eva02_base_patch14_224", "token", "linear"))


def test_debug_models_of_the_shipped_architectures_keep_their_kinds():
    unimed = derive_debug_model(resolve_config("medclip-vit-b16-biomedbert")).config
    assert unimed["quick_gelu"] is True and unimed["vision_cfg"]["layers"] <= 2
    assert unimed["text_cfg"]["hf_model_name"].endswith("tiny-bert")  # an HF BERT tower, offline
    assert (unimed["text_cfg"]["hf_pooler_type"], unimed["text_cfg"]["hf_proj_type"]) == (
        "cls_last_hidden_state_pooler", "mlp")
    siglip = derive_debug_model(resolve_config("medclip-siglip-so400m-pubmedbert")).config
    # ConceptCLIP's text pooling (the mean of the token states) is kept
    assert siglip["init_logit_bias"] == -10 and siglip["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    assert siglip["embed_dim"] == 96  # timm_proj none: the joint space is the debug trunk's own width
    assert sum(p.numel() for p in build_model(siglip).parameters()) < 3e6


@pytest.fixture(scope="module")
def pool():
    return stand_in_pool(64)


def _members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for info in tar:
            key, ext = info.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return out


def test_stand_in_shards_take_each_manifests_format(tmp_path, pool):
    # UniMed label-only source: several captions in KEY.txt, joined by the manifest's separator.
    source = {"manifest": str(MANIFESTS / "unimed-chexpert.yaml"), "root": None}
    found = prepare_source(source, pool, tmp_path, min_samples=30)
    assert found.kind == "stand-in" and source["root"] == str(tmp_path / "unimed-chexpert")
    manifest = load_manifest(source["manifest"], root=source["root"])
    assert check_manifest(manifest) == []  # every shard the pattern names, with the builder's summary
    sample = next(iter(_members(Path(manifest.urls[0])).values()))
    assert set(sample) == {"jpg", "txt"} and len(sample["txt"].decode().split("<SEP>")) == 3
    # medclip's layout: JSON captions with concept spans and boxes.
    roco = {"manifest": str(MANIFESTS / "unimed-roco.yaml")}
    prepare_source(roco, pool, tmp_path, min_samples=30)
    shards = load_manifest(roco["manifest"], root=roco["root"]).urls
    metas = [json.loads(m["json"]) for s in shards for m in _members(Path(s)).values()]
    assert any(m["concepts"] and m.get("boxes") for m in metas) and all(len(m["captions"]) == 3 for m in metas)


def test_medconcept_stand_in_goes_through_the_umls_meta_info_reader(tmp_path, pool):
    raw = {"input_format": "medconcept"}
    manifest = load_manifest(MANIFESTS / "medconcept-23m.yaml", root=str(tmp_path / "root"))
    assert shard_format(manifest, raw) == "medconcept"
    source = {"manifest": str(MANIFESTS / "medconcept-23m.yaml")}
    prepare_source(source, pool, tmp_path, min_samples=1)
    row = json.loads((tmp_path / "work" / "medconcept-23m" / "inputs" / "medconcept.jsonl").read_text())
    assert {"caption", "image", "umls_meta_info"} <= set(row) and row["umls_meta_info"][0]["umls_cui"]
    shard = load_manifest(source["manifest"], root=source["root"]).urls[5]
    meta = json.loads(next(iter(_members(Path(shard)).values()))["json"])
    assert len(meta["captions"]) == 1 and meta["concepts"]  # one figure caption, spans from umls_meta_info
    span = meta["concepts"][0]
    assert meta["captions"][0][span["start"]:span["end"]].lower() == span["name"].lower()


def test_creating_the_training_loader_leaves_the_global_rng_alone(tmp_path, pool):
    """A resumed run creates its DataLoader mid-run; drawing from torch's RNG then shifts dropout masks."""
    from medclip.data.stream import build_train_stream
    from medclip.models.loading import build_tokenizer

    source = {"manifest": str(MANIFESTS / "unimed-roco.yaml")}
    prepare_source(source, pool, tmp_path, min_samples=16)
    manifest = load_manifest(source["manifest"], root=source["root"])
    cfg = resolve_config("medclip-tiny")
    stream = build_train_stream([manifest], build_tokenizer(cfg), lambda image: torch.zeros(3, 8, 8), 4,
                                num_workers=1, shuffle_buffer=0, uint8_images=False)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(stream))
    assert torch.equal(torch.rand(3), expected)


def test_loss_check_judges_each_term_over_its_own_steps(tmp_path):
    """A staged objective raises the total when PC-Align joins; the check must not call that divergence,
    and must still fail a term that does not fall."""
    from types import SimpleNamespace

    from medclip.training.rehearsal.checks import Runs, loss_finite_and_falling

    recipe = load_recipe("pretrain/shared_real.yaml", ["run.steps=8", "objective.pc_start_step=4"])

    def check(pc_values):
        log = tmp_path / "log.jsonl"
        its = [2.5, 2.4, 2.3, 2.2, 2.1, 2.0, 1.9, 1.8]
        pcs = [0.0] * 4 + pc_values
        log.write_text("".join(json.dumps({"step": s + 1, "loss": it + 0.1 * pc, "it": it, "pc": pc}) + "\n"
                               for s, (it, pc) in enumerate(zip(its, pcs))))
        runs = Runs(plan=SimpleNamespace(), work=tmp_path, recipe=recipe, straight=tmp_path, resumed=tmp_path,
                    launches={}, kill_step=0, resume_step=0)
        return loss_finite_and_falling(runs)

    staged = check([20.0, 15.0, 10.0, 8.0])  # total: 2.2 at step 4 -> 4.0 at step 5, then falling
    assert staged.ok, staged.lines
    assert not check([8.0, 10.0, 15.0, 20.0]).ok  # PC-Align rising over its own steps


def test_a_budgeted_recipe_is_rehearsed_for_its_fixed_steps():
    """A wall-clock budget re-plans the steps from the clock; the rehearsal compares runs step by step, so
    its plan runs exactly STEPS steps and says it dropped the budget."""
    import copy

    from medclip.training.rehearsal.plan import STEPS, RehearsalPlan, _schedule

    recipe = load_recipe("demo", ["run.budget_seconds=3600", "run.budget_from=process"])
    plan = RehearsalPlan("demo", recipe, copy.deepcopy(recipe.to_dict()))
    _schedule(plan)
    assert plan.values["run"]["steps"] == STEPS and plan.values["run"]["budget_seconds"] is None
    assert [s.before for s in plan.swaps if s.key == "run.budget_seconds"] == [3600.0]
