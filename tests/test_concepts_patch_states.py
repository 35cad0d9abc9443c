"""PC-Align heads that read the patch embeddings with a neighbourhood (pc_patch_states / pc_patch_context):
the states are the first block's input, the neighbourhood is the grid's, training and queries read the
same states, and the choice survives export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_concepts_explain import gradient_image
from test_losses_objective import _batch

from medclip.concepts import explain
from medclip.errors import MedclipError
from medclip.losses import Objective, ObjectiveConfig, World
from medclip.models import towers
from medclip.models.heads import ConceptHeads, ConceptHeadsConfig


def _local_heads(model, context=3, seed=0):
    torch.manual_seed(seed)
    config = ConceptHeadsConfig(towers.image_width(model), towers.text_width(model), 32, patch_states="embed",
                                patch_context=context)
    return ConceptHeads(config)


def _embeddings_by_hand(visual, images):
    """The ViT's patch embeddings from its public modules: conv, positional embedding, ln_pre."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, P, W]
    x = x + visual.positional_embedding[1:]  # row 0 belongs to the class token
    return visual.ln_pre(x)  # a per-token norm: the class token does not change the patches'


def _neighbourhood_by_hand(states, grid, k):
    """[B, P, W] -> [B, P, W k^2], channel-major like F.unfold: for each channel, its k x k window."""
    rows, cols = grid
    b, _, w = states.shape
    maps = states.reshape(b, rows, cols, w)
    out = torch.zeros(b, rows, cols, w, k, k)
    r = k // 2
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            for y in range(rows):
                for x in range(cols):
                    if 0 <= y + dy < rows and 0 <= x + dx < cols:
                        out[:, y, x, :, dy + r, dx + r] = maps[:, y + dy, x + dx]
    return out.reshape(b, rows * cols, w * k * k)


def test_embed_states_are_the_first_blocks_input(tiny_encoder):
    model = tiny_encoder.model.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, states = towers.image_tokens(model, images, "embed")
        torch.testing.assert_close(states, _embeddings_by_hand(model.visual, images))
        torch.testing.assert_close(pooled, model.encode_image(images))
    with pytest.raises(MedclipError, match="'last', 'embed', 'stem' or 'block<N>'"):
        towers.image_tokens(model, images, "middle")


def test_stem_states_are_the_patches_without_their_positions(tiny_encoder):
    # What a patch shows, not where: the same pixels at two places of the image give the same stem state.
    model = tiny_encoder.model.eval()
    visual = model.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    images[:, :, 8:16, 0:8] = images[:, :, 40:48, 24:32]  # patch (1, 0) repeats patch (5, 3)
    with torch.no_grad():
        pooled, states = towers.image_tokens(model, images, "stem")
        torch.testing.assert_close(pooled, model.encode_image(images))
        by_hand = visual.ln_pre(F.conv2d(images, visual.conv1.weight, stride=8).flatten(2).transpose(1, 2))
        torch.testing.assert_close(states, by_hand)
        torch.testing.assert_close(states[:, 8], states[:, 5 * 8 + 3])
        _, embedded = towers.image_tokens(model, images, "embed")
    assert not torch.allclose(embedded[:, 8], embedded[:, 5 * 8 + 3])  # 'embed' adds where the patch is


def test_block_states_are_that_blocks_output(tiny_encoder):
    """'block<N>': the tokens after the N-th block through ln_post, from the pass that gives the pooled features."""
    model = tiny_encoder.model.eval()
    visual = model.visual
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = visual.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.expand(2, 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        by_block = []
        for block in visual.transformer.resblocks:
            x = block(x)
            by_block.append(visual.ln_post(x)[:, 1:])
        for n in range(1, len(by_block) + 1):
            pooled, states = towers.image_tokens(model, images, f"block{n}")
            torch.testing.assert_close(states, by_block[n - 1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(pooled, model.encode_image(images))
        torch.testing.assert_close(towers.image_tokens(model, images, "last")[1], by_block[-1], atol=1e-5, rtol=1e-4)
    depth = len(by_block)
    with pytest.raises(MedclipError, match=f"has {depth} blocks"):
        towers.image_tokens(model, images, f"block{depth + 1}")
    for bad in ("block0", "block", "block-1", "block01"):
        with pytest.raises(MedclipError, match="block<N>"):
            ConceptHeadsConfig(6, 4, 5, patch_states=bad)


def test_patch_context_reads_the_grid_neighbourhood():
    heads = ConceptHeads(ConceptHeadsConfig(6, 4, 5, patch_states="embed", patch_context=3))
    states = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(1))
    grid = (3, 4)  # not square: rows and columns must not be swapped
    expected = heads.patch_head(_neighbourhood_by_hand(states, grid, 3))
    torch.testing.assert_close(heads.embed_patches(states, grid), expected)
    assert heads.patch_head[0].weight.shape == (5, 6 * 9)
    with pytest.raises(MedclipError, match="patch grid"):
        heads.embed_patches(states)
    for bad in ({"patch_context": 2}, {"patch_context": 0}, {"patch_states": "middle"}):
        with pytest.raises(MedclipError, match="patch_"):
            ConceptHeadsConfig(6, 4, 5, **bad)
    with pytest.raises(MedclipError, match="objective.pc_patch_context must be an odd number"):
        ObjectiveConfig.from_dict({"pc_patch_context": 4})


def test_objective_trains_the_heads_on_local_states(tiny_encoder):
    """PC-Align's loss is computed on the embeddings' neighbourhoods, and reaches no transformer block."""
    model, batch = tiny_encoder.model, _batch(tiny_encoder)
    heads = _local_heads(model)
    objective = Objective(ObjectiveConfig(pc_weight=1.0, pc_patch_states="embed", pc_patch_context=3),
                          world=World.single())
    features = objective.forward_features(model, heads, batch, step=0)
    with torch.no_grad():
        local = _neighbourhood_by_hand(_embeddings_by_hand(model.visual, batch["images"]), towers.grid_size(model), 3)
        torch.testing.assert_close(features.patches, heads.patch_head(local), atol=1e-5, rtol=1e-4)
    pc = objective.losses(features, 0, model, heads)["pc"]
    blocks = list(model.visual.transformer.parameters())
    grads = torch.autograd.grad(pc, [model.visual.conv1.weight, *blocks], allow_unused=True)
    assert grads[0].abs().sum() > 0
    assert all(g is None or g.abs().sum() == 0 for g in grads[1:])
    assert objective.config.heads_options() == {"patch_states": "embed", "patch_context": 3, "patch_head": "mlp"}


def test_queries_read_what_the_heads_were_trained_on_and_export_keeps_it(tiny_encoder, tmp_path):
    import medclip
    from medclip.models.export import save

    encoder = medclip.load("medclip-tiny", device="cpu")
    encoder.heads = _local_heads(encoder.model, seed=2).eval()
    image = gradient_image(seed=5)
    names = ["pleural effusion", "nodule"]
    maps = explain(encoder, image, names)
    with torch.no_grad():
        states = _embeddings_by_hand(encoder.model.visual, encoder.preprocess(image)[None])
        patches = F.normalize(encoder.heads.patch_head(_neighbourhood_by_hand(states, encoder.grid_size, 3))[0], dim=-1)
        from medclip.concepts.scoring import ConceptScorer

        concepts = ConceptScorer(encoder).concept_vectors(names)
    heads = encoder.heads
    expected = heads.logit_scale.exp() * concepts @ patches.T + heads.logit_bias
    torch.testing.assert_close(maps.scores.flatten(1), expected.detach(), atol=1e-4, rtol=1e-4)
    reloaded = medclip.load(str(save(encoder, tmp_path / "export")), device="cpu")
    assert reloaded.heads.config == heads.config
    torch.testing.assert_close(explain(reloaded, image, names).scores, maps.scores)


def test_recipe_with_a_block_the_tower_lacks_stops_when_the_heads_are_built(tiny_encoder, tmp_path):
    from medclip.training.config import load_recipe
    from medclip.training.parts import build_heads

    recipe = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "model.name=medclip-tiny", "objective.pc_weight=0.5",
                                "objective.pc_patch_states=block4"])
    with pytest.raises(MedclipError, match=r"objective.pc_patch_states: patch states 'block4': the image tower has 3 blocks"):
        build_heads(recipe, tiny_encoder.model, {"embed_dim": 128}, torch.device("cpu"))
    ok = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "objective.pc_weight=0.5", "objective.pc_patch_states=block2"])
    assert build_heads(ok, tiny_encoder.model, {"embed_dim": 128}, torch.device("cpu")).config.patch_states == "block2"


def test_conv_patch_head_is_two_convolutions_over_the_grid_and_survives_export(tiny_encoder, tmp_path):
    """'conv': k x k conv, GELU, 3x3 conv, GELU, 1x1 conv over the patch grid (zero beyond the edge)."""
    import medclip
    from medclip.models.export import save

    heads = ConceptHeads(ConceptHeadsConfig(6, 4, 5, patch_states="embed", patch_context=3, patch_head="conv"))
    states = torch.randn(2, 12, 6, generator=torch.Generator().manual_seed(1))
    grid = (3, 4)
    first, second, last = (m.weight for m in heads.patch_head if isinstance(m, torch.nn.Conv2d))
    # the first layer is the 'mlp' head's k x k neighbourhood layer: the same numbers through F.unfold's order
    hidden = F.gelu(_neighbourhood_by_hand(states, grid, 3) @ first.flatten(1).T)  # [B, P, hidden]
    maps = hidden.transpose(1, 2).reshape(2, -1, *grid)
    hidden = F.gelu(F.conv2d(maps, second, padding=1))
    expected = F.conv2d(hidden, last).flatten(2).transpose(1, 2)
    torch.testing.assert_close(heads.embed_patches(states, grid), expected, atol=1e-5, rtol=1e-4)
    with pytest.raises(MedclipError, match="patch grid"):
        heads.embed_patches(states)
    with pytest.raises(MedclipError, match="objective.pc_patch_head must be one of"):
        ObjectiveConfig.from_dict({"pc_patch_head": "transformer"})

    encoder = medclip.load("medclip-tiny", device="cpu")
    config = ConceptHeadsConfig(towers.image_width(encoder.model), towers.text_width(encoder.model), 32,
                                patch_states="embed", patch_context=3, patch_head="conv")
    encoder.heads = ConceptHeads(config).eval()
    image, names = gradient_image(seed=5), ["pleural effusion", "nodule"]
    reloaded = medclip.load(str(save(encoder, tmp_path / "export")), device="cpu")
    assert reloaded.heads.config.patch_head == "conv"
    torch.testing.assert_close(explain(reloaded, image, names).scores, explain(encoder, image, names).scores)


def test_resuming_with_heads_that_read_other_states_stops_with_one_line(tmp_path):
    """'embed' and 'block1' heads have the same tensors: without the check the run would resume heads trained on
    one kind of state reading another."""
    from engine_helpers import FixedStream, make_batch, recipe

    from medclip.training.checkpoint import list_checkpoints
    from medclip.training.trainer import Pretrainer

    def run(*overrides: str, resume=None):
        r = recipe(tmp_path, "run.steps=2", "run.checkpoint_every=1", "objective.pc_patch_context=3", *overrides)
        return Pretrainer.from_recipe(r, resume=resume, data=FixedStream(make_batch(8, seed=1)))

    run("objective.pc_patch_states=embed").run()
    checkpoint = list_checkpoints(tmp_path)[-1]
    for item, was in (("pc_patch_states=block1", "embed"), ("pc_patch_head=conv", "mlp")):
        with pytest.raises(MedclipError) as caught:
            run("objective.pc_patch_states=embed", f"objective.{item}", "run.steps=3", resume="latest")
        key = item.split("=")[0]
        assert str(caught.value) == (f"--resume: {checkpoint} was trained with objective.{key} {was}, this recipe "
                                     f"has {item.split('=')[1]}; resume with --set objective.{key}={was}, or start "
                                     f"a new run in another run.output_dir")


def test_vit_layouts_without_per_patch_states_stop_when_the_heads_are_built(tmp_path):
    import open_clip

    from medclip.training.config import load_recipe
    from medclip.training.parts import build_heads

    config = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}}
    for vision, states, message in (
            ({"final_ln_after_pool": True}, "last", "final_ln_after_pool false"),
            ({"patch_dropout": 0.5}, "block1", "patch states 'block1' need the whole patch grid"),
            ({"patch_dropout": 0.5}, "embed", "patch states 'embed' need the whole patch grid")):
        model = open_clip.CLIP(config["embed_dim"], {**config["vision_cfg"], **vision}, config["text_cfg"]).train()
        r = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "objective.pc_weight=0.5",
                               f"objective.pc_patch_states={states}"])
        with pytest.raises(MedclipError, match=f"^objective.pc_patch_states: .*{message}"):
            build_heads(r, model, config, torch.device("cpu"))
    # 'last' with patch dropout: any subset of the last block's tokens is a bag of patches (as before)
    model = open_clip.CLIP(32, {**config["vision_cfg"], "patch_dropout": 0.5}, config["text_cfg"]).train()
    r = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "objective.pc_weight=0.5"])
    assert build_heads(r, model, config, torch.device("cpu")) is not None
