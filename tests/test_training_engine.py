"""Engine correctness on synthetic batches: accumulation, the run loop's bookkeeping, FLOP counting
without side effects, torch.compile. (Two-process DDP / FSDP2 runs: test_training_distributed.py.)"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import FixedStream, grads, make_batch, recipe

import medclip
from medclip.training.config import load_recipe


def _pretrainer(r, batch):
    from medclip.training.trainer import Pretrainer

    return Pretrainer.from_recipe(r, data=FixedStream(batch))


@pytest.mark.parametrize("it_kind", ["infonce", "sigmoid"])
def test_accumulation_over_micro_batches_equals_one_full_batch(tmp_path, it_kind):
    batch = make_batch(8)
    full = _pretrainer(recipe(tmp_path / "a", f"objective.it_kind={it_kind}"), batch)
    accum = _pretrainer(recipe(tmp_path / "b", f"objective.it_kind={it_kind}", "optim.accum_steps=4"), batch)
    accum.module.load_state_dict(full.module.state_dict())
    losses_full, losses_accum = full.backward(batch), accum.backward(batch)
    for key in ("total", "it", "pc"):
        torch.testing.assert_close(losses_accum[key], losses_full[key], atol=1e-5, rtol=1e-5)
    g_full, g_accum = grads(full.module), grads(accum.module)
    assert g_full.keys() == g_accum.keys() and "model.logit_scale" in g_full and "heads.logit_bias" in g_full
    for name in g_full:
        torch.testing.assert_close(g_accum[name], g_full[name], atol=1e-5, rtol=1e-4, msg=name)


def test_accumulation_replays_dropout_so_live_features_equal_the_cached_ones(tmp_path, monkeypatch):
    """A BERT text tower trains with dropout 0.1: each micro-batch's re-forward must draw the masks its
    cached forward drew, else the gradient mixes two different networks."""
    from medclip.training.components import TrainModule

    batch = make_batch(8, model="medclip-tiny-bert")
    trainer = _pretrainer(recipe(tmp_path, "model.name=medclip-tiny-bert", "optim.accum_steps=2"), batch)
    assert trainer.model.text.config.hidden_dropout_prob > 0 and trainer.model.training
    differences = []
    merge = TrainModule.merge_features

    def checked_merge(cached, live_index, live):
        differences.append(max((live[k] - cached[live_index][k]).abs().max().item()
                               for k in live if isinstance(live[k], torch.Tensor) and live[k].is_floating_point()))
        return merge(cached, live_index, live)

    monkeypatch.setattr(TrainModule, "merge_features", staticmethod(checked_merge))
    rng = torch.get_rng_state()
    trainer.backward(batch)
    assert differences == [0.0, 0.0]
    assert not torch.equal(torch.get_rng_state(), rng)  # the masks were drawn once, from the training RNG


def test_training_steps_reduce_the_loss_and_clamp_the_scale(tmp_path):
    batch = make_batch(8)
    trainer = _pretrainer(recipe(tmp_path, "optim.lr=2e-3", "optim.logit_scale_max=2.0"), batch)
    first = trainer.train_step(batch)["total"].item()
    for _ in range(7):
        last = trainer.train_step(batch)["total"].item()
    assert last < first
    assert trainer.step == 8
    assert trainer.module.model.logit_scale.item() <= 2.0 + 1e-6


def test_concept_names_flow_from_the_stream_into_pc_align(tmp_path):
    from medclip.training.trainer import Pretrainer

    r = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "data.demo_train_samples=64",
                           "data.demo_val_samples=0", "data.batch_size=16", "data.num_workers=0",
                           "run.progress=false", "run.tensorboard=false", "objective.pc_weight=0.5",
                           "objective.use_concept_names=true"])
    trainer = Pretrainer.from_recipe(r)
    batch = next(iter(trainer.data))
    names, mask = batch["concept_name_tokens"], batch["concept_mask"]
    assert names.shape[:2] == mask.shape and names.shape[2] == 16
    tokenizer = medclip.load("medclip-tiny").tokenizer
    first = mask.nonzero()[0]
    decoded = tokenizer.decode(names[first[0], first[1]].tolist())
    assert any(word in decoded for word in ("effusion", "nodule", "mass", "fracture", "cardiomegaly",
                                            "pneumothorax", "cyst", "hemorrhage", "carcinoma"))
    empty = batch["concept_spans"][..., 1] == 0  # slots holding no concept
    assert empty.any() and (names[empty] == 0).all()  # pad ids only (BPE pads with 0)
    losses = trainer.train_step(batch)
    assert torch.isfinite(losses["pc"]) and losses["pc"] > 0


def test_a_finished_run_draws_only_the_batches_it_trains_on(tmp_path):
    """The final checkpoint's data position and the summary's counts cover run.steps batches, not one more."""
    from medclip.training.trainer import Pretrainer

    stream = FixedStream(make_batch(8))
    Pretrainer.from_recipe(recipe(tmp_path, "run.steps=3", "run.log_every=1"), data=stream).run()
    assert stream.position == 3
    final = torch.load(tmp_path / "checkpoints" / "step_3.pt", weights_only=True)
    assert final["data"] == [{"position": 3}]
    assert "skipped samples: batches_drawn=3\n" in (tmp_path / "summary.txt").read_text()


TINY_RESNET = {"embed_dim": 64,
               "vision_cfg": {"timm_model_name": "resnet18", "timm_model_pretrained": False, "timm_pool": "avg",
                              "timm_proj": "linear", "image_size": 64},
               "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


def test_flop_counting_changes_no_weights_batchnorm_statistics_or_rng(tmp_path, monkeypatch):
    """MFU reporting (a device with a known peak) must train exactly as a run without it."""
    import json

    import open_clip

    from medclip.training import trainer as trainer_module

    (tmp_path / "medclip-test-resnet.json").write_text(json.dumps(TINY_RESNET))
    open_clip.add_model_config(tmp_path / "medclip-test-resnet.json")  # a ResNet tower: BatchNorm statistics
    batch = make_batch(8)

    def finished_run(name: str, peak: float | None) -> dict:
        monkeypatch.setattr(trainer_module, "device_peak_tflops", lambda device: peak)
        r = recipe(tmp_path / name, "model.name=medclip-test-resnet", "run.steps=2", "run.log_every=1")
        trainer_module.Pretrainer.from_recipe(r, data=FixedStream(batch)).run()
        return torch.load(tmp_path / name / "checkpoints" / "step_2.pt", weights_only=True)

    plain, measured = finished_run("plain", None), finished_run("measured", 100.0)
    assert any(k.endswith("running_mean") for k in plain["model"])
    for part in ("model", "heads"):
        for key, value in plain[part].items():
            torch.testing.assert_close(measured[part][key], value, atol=0, rtol=0, msg=key)
    assert torch.equal(measured["rng"][0]["torch"], plain["rng"][0]["torch"])
    records = [json.loads(line) for line in (tmp_path / "measured" / "log.jsonl").read_text().splitlines()]
    assert records[0]["tflops_per_device"] > 0 and 0 < records[0]["mfu"]


@pytest.mark.integration
def test_compiled_training_matches_eager_without_recompiling_each_step(tmp_path, monkeypatch):
    """`model.compile` wiring: the wrapped module goes through torch.compile, trains like eager mode, and a
    new step number does not recompile it. The backend here is dynamo's capture with eager kernels (the
    inductor's C++ build of this tiny model takes minutes on a CPU; GPUs use it as is)."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend=counting_backend))
    batch = make_batch(8)
    eager = _pretrainer(recipe(tmp_path / "eager"), batch)
    compiled = _pretrainer(recipe(tmp_path / "compiled", "model.compile=true"), batch)
    compiled.module.load_state_dict(eager.module.state_dict())
    try:
        counts = []
        for _ in range(3):
            want, got = eager.train_step(batch), compiled.train_step(batch)
            torch.testing.assert_close(got["total"], want["total"], atol=1e-6, rtol=1e-6)
            counts.append(len(graphs))
        assert counts[0] > 0 and counts[1] == counts[2] == counts[0]
        for key, value in eager.module.state_dict().items():
            torch.testing.assert_close(compiled.module.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    finally:
        torch._dynamo.reset()
