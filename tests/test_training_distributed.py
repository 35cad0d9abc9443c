"""Whole runs in two processes (gloo): `Pretrainer.run()` under DDP, DDP with accumulation, and FSDP2
equals one process on the same global batches — loss at every step, final weights and their EMA, and (FSDP2)
an export that plain open_clip loads with the same embeddings; an FSDP2 run stopped after step 4 and resumed
from step 3 ends with the straight run's weights and EMA bit for bit (the EMA's shards gathered for the
checkpoint and sharded again on resume).

Tolerances: each run computes the same sums in another order (gradients reduced across ranks,
gathered features, micro-batches), so float32 rounding (~1e-7 relative) differs from step 1 on, and
AdamW divides every update by the root of its squared-gradient average, which turns a rounding
difference in a near-zero gradient into an update difference of up to lr (1e-3) in that element.
Measured here (gloo, CPU): loss curves within 1e-6 at every step; final weights within 3.1e-5
(DDP and DDP + accumulation, 20 steps) and 2.3e-5 (FSDP2, 6 steps); exported embeddings within 2e-6.
The tolerances are 10x those figures. Training each rank on its half without DDP's gradient reduction
(the test broken on purpose) gives losses 1.1 and weights 1.7e-2 apart.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp
from engine_helpers import ShardedStream, free_port, make_batch, recipe

from medclip.training.callbacks import Callback

STEPS = 20
FSDP_STEPS = 6
GLOBAL_BATCH = 8
LOSS_ATOL = 1e-5
WEIGHT_ATOL = 3e-4
EMBED_ATOL = 2e-5
RUNS = {  # name: (overrides, steps)
    "ddp": (["run.strategy=ddp"], STEPS),
    "ddp_accum": (["run.strategy=ddp", "optim.accum_steps=2"], STEPS),
    "fsdp": (["run.strategy=fsdp"], FSDP_STEPS),
}


def global_batches() -> list[dict]:
    return [make_batch(GLOBAL_BATCH, seed=step + 1) for step in range(STEPS)]


def run_recipe(out, world: int, overrides: list[str], steps: int):
    return recipe(out, f"data.batch_size={GLOBAL_BATCH // world}", f"run.steps={steps}", "run.log_every=1",
                  "run.checkpoint_every=1000", "optim.lr=1e-3", "optim.warmup_steps=2", "optim.ema_decay=0.5",
                  *overrides)


class Stopped(Exception):
    pass


class StopAfterStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, batch, losses):
        if trainer.step == self.step:
            raise Stopped


def _worker(rank: int, world: int, port: int, root: str):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medclip.training.trainer import Pretrainer

    batches = global_batches()
    for name, (overrides, steps) in RUNS.items():
        r = run_recipe(f"{root}/{name}", world, overrides, steps)
        Pretrainer.from_recipe(r, data=ShardedStream(batches, rank, world)).run()
    stopped = run_recipe(f"{root}/fsdp_resumed", world, ["run.strategy=fsdp", "run.checkpoint_every=3"], FSDP_STEPS)
    try:
        Pretrainer.from_recipe(stopped, data=ShardedStream(batches, rank, world), callbacks=[StopAfterStep(4)]).run()
    except Stopped:
        pass
    Pretrainer.from_recipe(stopped, resume="latest", data=ShardedStream(batches, rank, world)).run()
    torch.distributed.destroy_process_group()


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]


def max_weight_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    mp.spawn(_worker, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory):
    from medclip.training.trainer import Pretrainer

    root = tmp_path_factory.mktemp("one")
    batches = global_batches()
    for steps in sorted({steps for _, steps in RUNS.values()}):
        Pretrainer.from_recipe(run_recipe(root / f"steps{steps}", 1, [], steps), data=ShardedStream(batches)).run()
    return root


@pytest.mark.integration
@pytest.mark.parametrize("name", ["ddp", "ddp_accum"])
def test_two_process_ddp_run_equals_one_process(name, two_process_runs, one_process_runs):
    two, one = two_process_runs / name, one_process_runs / f"steps{STEPS}"
    got, want = losses(two), losses(one)
    assert len(got) == len(want) == STEPS and want[-1] < want[0]
    loss_diff = max(abs(a - b) for a, b in zip(got, want))
    ckpt_two = torch.load(two / "checkpoints" / f"step_{STEPS}.pt", weights_only=True)
    ckpt_one = torch.load(one / "checkpoints" / f"step_{STEPS}.pt", weights_only=True)
    weight_diff = max(max_weight_difference(ckpt_two[p], ckpt_one[p]) for p in ("model", "heads"))
    ema_diff = max_weight_difference(ckpt_two["ema"]["weights"], ckpt_one["ema"]["weights"])
    print(f"{name}: {STEPS} steps, max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}, "
          f"max |EMA diff| {ema_diff:.2e}")
    assert loss_diff < LOSS_ATOL and weight_diff < WEIGHT_ATOL and ema_diff < WEIGHT_ATOL
    assert ckpt_two["world_size"] == 2 and len(ckpt_two["data"]) == 2


@pytest.mark.integration
def test_two_process_fsdp2_run_equals_one_process_and_exports_for_open_clip(two_process_runs, one_process_runs):
    import open_clip

    two, one = two_process_runs / "fsdp", one_process_runs / f"steps{FSDP_STEPS}"
    got, want = losses(two), losses(one)
    loss_diff = max(abs(a - b) for a, b in zip(got, want))
    ckpt_two = torch.load(two / "checkpoints" / f"step_{FSDP_STEPS}.pt", weights_only=True)
    ckpt_one = torch.load(one / "checkpoints" / f"step_{FSDP_STEPS}.pt", weights_only=True)
    weight_diff = max(max_weight_difference(ckpt_two[p], ckpt_one[p]) for p in ("model", "heads"))
    # The gathered full weights have the architecture's shapes (scalars stored as scalars again).
    assert {k: v.shape for k, v in ckpt_two["model"].items()} == {k: v.shape for k, v in ckpt_one["model"].items()}

    images, captions = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7)), ["a chest x-ray"]
    embeddings = []
    for out in (two, one):
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'export'}")
        with torch.no_grad():
            embeddings.append((model.eval().encode_image(images), model.encode_text(tokenizer(captions))))
    embed_diff = max((a - b).abs().max().item() for a, b in zip(*embeddings))
    print(f"fsdp: {FSDP_STEPS} steps, max |loss diff| {loss_diff:.2e}, max |weight diff| {weight_diff:.2e}, "
          f"max |embedding diff| {embed_diff:.2e}")
    assert len(got) == FSDP_STEPS and loss_diff < LOSS_ATOL and weight_diff < WEIGHT_ATOL and embed_diff < EMBED_ATOL


@pytest.mark.integration
def test_fsdp2_ema_is_checkpointed_whole_and_resumed_bit_for_bit(two_process_runs, one_process_runs):
    straight, resumed, one = two_process_runs / "fsdp", two_process_runs / "fsdp_resumed", one_process_runs
    final = torch.load(straight / "checkpoints" / f"step_{FSDP_STEPS}.pt", weights_only=True)
    alone = torch.load(one / f"steps{FSDP_STEPS}" / "checkpoints" / f"step_{FSDP_STEPS}.pt", weights_only=True)
    ema, ema_alone = final["ema"]["weights"], alone["ema"]["weights"]
    # Gathered from the shards: the architecture's whole shapes (scalars as scalars), as one process has them.
    assert {k: v.shape for k, v in ema.items()} == {k: v.shape for k, v in ema_alone.items()}
    ema_diff = max_weight_difference(ema, ema_alone)
    assert ema_diff < WEIGHT_ATOL and final["ema"]["updates"] == FSDP_STEPS

    got = torch.load(resumed / "checkpoints" / f"step_{FSDP_STEPS}.pt", weights_only=True)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir())[:1] == ["step_3.pt"]  # resumed from 3
    for part, want in (("model", final["model"]), ("heads", final["heads"]), ("ema", ema)):
        tensors = got[part]["weights"] if part == "ema" else got[part]
        assert tensors.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(tensors[key], value), f"{part}.{key}"
    print(f"fsdp EMA: max |difference| to one process {ema_diff:.2e}; resumed run bit-identical")
