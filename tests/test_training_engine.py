"""Engine correctness on synthetic batches: accumulation, DDP and FSDP2 (gloo, 2 processes)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import medclip
from medclip.data.concepts import concept_key
from medclip.training.config import load_recipe

CAPTIONS = ["pleural effusion in the left lung", "nodule in the right upper lobe", "brain mri without mass",
            "fracture of the left femur", "cardiomegaly on chest x-ray", "liver mass on ct",
            "right pleural effusion and nodule", "normal knee radiograph"]
CUIS = ["C0032227", "C0028259", "C0577559", "C0016658", "C0018800", "C0577559", "C0032227", None]


def make_batch(size: int = 8, seed: int = 0) -> dict:
    """A fixed batch in the training-batch contract (one concept per caption, token spans)."""
    g = torch.Generator().manual_seed(seed)
    tokenizer = medclip.load("medclip-tiny").tokenizer
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(size)]
    text = tokenizer(captions)
    spans = torch.tensor([[[1, 3]] for _ in captions])
    ids = torch.tensor([[concept_key(CUIS[i % len(CUIS)] or "none")] for i in range(size)])
    mask = torch.tensor([[CUIS[i % len(CUIS)] is not None] for i in range(size)])
    return {"images": torch.randn(size, 3, 64, 64, generator=g), "text": text, "concept_spans": spans,
            "concept_ids": ids, "concept_mask": mask, "keys": [f"k{i}" for i in range(size)]}


class FixedStream:
    """Yields the same rank-local batch forever; enough state for checkpoints."""

    def __init__(self, batch: dict):
        self.batch, self.position = batch, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def skip_counts(self) -> dict:
        return {}


def recipe(tmp_path, *overrides: str):
    return load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "data.batch_size=8",
                              "run.progress=false", "run.tensorboard=false", "objective.pc_weight=0.5",
                              "optim.warmup_steps=1", *overrides])


def grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _pretrainer(r, batch):
    from medclip.training.trainer import Pretrainer

    return Pretrainer(r, data=FixedStream(batch))


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


def test_training_steps_reduce_the_loss_and_clamp_the_scale(tmp_path):
    batch = make_batch(8)
    trainer = _pretrainer(recipe(tmp_path, "optim.lr=2e-3", "optim.logit_scale_max=2.0"), batch)
    first = trainer.train_step(batch)["total"].item()
    for _ in range(7):
        last = trainer.train_step(batch)["total"].item()
    assert last < first
    assert trainer.step == 8
    assert trainer.module.model.logit_scale.item() <= 2.0 + 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, strategy: str, result_file: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medclip.training.trainer import Pretrainer

    full = make_batch(8)
    local = {k: v[rank * 4:(rank + 1) * 4] for k, v in full.items()}
    r = load_recipe(None, [f"run.output_dir={out_dir}", "data.demo=true", "data.batch_size=4", "run.progress=false",
                           "run.tensorboard=false", "objective.pc_weight=0.5", f"run.strategy={strategy}",
                           "run.steps=2", "run.checkpoint_every=1000", "run.log_every=1"])
    trainer = Pretrainer(r, data=FixedStream(local))
    if strategy == "ddp":
        losses = trainer.backward(local)
        if rank == 0:
            torch.save({"grads": grads(trainer.module), "loss": losses["total"],
                        "state": trainer.module.state_dict()}, result_file)
    else:
        trainer.train_step(local)
        trainer.train_step(local)
        trainer.save_checkpoint()
    torch.distributed.destroy_process_group()


def test_ddp_first_step_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    result = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path / "ddp"), "ddp", str(result)), nprocs=2, join=True)
    ddp = torch.load(result, weights_only=True)
    single = _pretrainer(recipe(tmp_path / "single", "data.batch_size=8"), make_batch(8))
    single.module.load_state_dict(ddp["state"])
    loss = single.backward(make_batch(8))["total"]
    torch.testing.assert_close(ddp["loss"], loss, atol=1e-5, rtol=1e-5)
    expected = grads(single.module)
    got = {k.removeprefix("module."): v for k, v in ddp["grads"].items()}
    assert got.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_fsdp2_run_writes_a_checkpoint_one_process_loads(tmp_path):
    out = tmp_path / "fsdp"
    mp.spawn(_worker, args=(2, _free_port(), str(out), "fsdp", ""), nprocs=2, join=True)
    path = out / "checkpoints" / "step_2.pt"
    encoder = medclip.load(path)
    assert encoder.heads is not None
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["data"]) == 2
    assert torch.isfinite(encoder.encode_text(["pleural effusion"])).all()
    # The full (unsharded) weights were gathered: every tensor has the architecture's shape.
    fresh = medclip.load("medclip-tiny").model.state_dict()
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in fresh.items()}


def test_concept_names_flow_from_the_stream_into_pc_align(tmp_path):
    from medclip.training.trainer import Pretrainer

    r = load_recipe(None, [f"run.output_dir={tmp_path}", "data.demo=true", "data.demo_train_samples=64",
                           "data.demo_val_samples=0", "data.batch_size=16", "data.num_workers=0",
                           "run.progress=false", "run.tensorboard=false", "objective.pc_weight=0.5",
                           "objective.use_concept_names=true"])
    trainer = Pretrainer(r)
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
