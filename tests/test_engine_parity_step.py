"""Engine parity at the step: from the same weights, on the same batches, medclip's IT-only training steps give
the weights open_clip_train's own train_one_epoch gives (its loss, optimiser groups, lr schedule and logit-scale
clamp), BatchNorm statistics included. bench/engine_parity.py then compares whole runs on identical input."""

from __future__ import annotations

import copy
import math

import open_clip
import pytest
import torch
from engine_helpers import ShardedStream, make_batch, recipe
from open_clip_train.params import parse_args
from open_clip_train.scheduler import cosine_lr
from open_clip_train.train import train_one_epoch

import medclip
from medclip.training.trainer import Pretrainer

MODEL = "medclip-small-resnet18"  # the shared_real recipe's model, BatchNorm in its image tower
# Batch 8, not the recipe's 32: at 32, after step 2, 127 of the 1.18 M weights of one conv (layer4.0.conv1) differ
# by up to ~lr, all with gradients of ~1e-9 (Adam's sqrt(v) 1.2e-9 there, median 2.2e-8), where Adam turns
# rounding into full steps, as for the attention key bias below; by step 3 that reaches one BatchNorm mean.
STEPS, BATCH = 3, 8
SETTINGS = {"lr": 1e-3, "weight_decay": 0.1, "beta2": 0.999, "eps": 1e-8, "warmup_steps": 2}


class Batches:
    """open_clip_train's view of a data split: a loader with its length, and set_epoch."""

    def __init__(self, batches: list[dict]):
        self.dataloader = [(b["images"], b["text"]) for b in batches]
        self.dataloader = type("Loader", (list,), {"num_batches": len(batches),
                                                    "num_samples": len(batches) * BATCH})(self.dataloader)

    def set_epoch(self, epoch: int) -> None:
        pass


def open_clip_train_steps(model: torch.nn.Module, batches: list[dict], tmp_path) -> None:
    """open_clip_train's optimiser and schedule as its main builds them, then one epoch of its train_one_epoch."""
    args = parse_args(["--model", MODEL, "--batch-size", str(BATCH), "--lr", str(SETTINGS["lr"]),
                       "--wd", str(SETTINGS["weight_decay"]), "--beta1", "0.9", "--beta2", str(SETTINGS["beta2"]),
                       "--eps", str(SETTINGS["eps"]), "--warmup", str(SETTINGS["warmup_steps"]), "--precision", "fp32",
                       "--log-every-n-steps", "100", "--logs", str(tmp_path)])
    args.device, args.rank, args.local_rank, args.world_size, args.distributed = "cpu", 0, 0, 1, False
    args.distill, args.wandb = False, False  # set by its main
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": args.wd}],
        lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps)
    scheduler = cosine_lr(optimizer, args.lr, args.warmup, STEPS)
    loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    train_one_epoch(model, {"train": Batches(batches)}, loss, 0, optimizer, None, scheduler, None, args, None)


@pytest.mark.integration
def test_medclip_steps_equal_open_clip_trains(tmp_path):
    medclip.register_model_configs()
    batches = [make_batch(BATCH, seed=s, image_size=128, model=MODEL) for s in range(1, STEPS + 1)]
    overrides = [f"optim.{k}={v}" for k, v in SETTINGS.items()]
    trainer = Pretrainer.from_recipe(recipe(tmp_path / "run", f"model.name={MODEL}", "objective.pc_weight=0",
                                            f"run.steps={STEPS}", f"data.batch_size={BATCH}", *overrides),
                                     data=ShardedStream(batches))
    reference = open_clip.create_model(MODEL, output_dict=True)  # as open_clip_train creates it
    reference.load_state_dict(copy.deepcopy(trainer.model.state_dict()))
    try:
        trainer.model.train()
        for batch in batches:
            trainer.train_step(batch)
    finally:
        trainer.lock.release()
    open_clip_train_steps(reference, batches, tmp_path / "open_clip_train")

    ours, theirs = trainer.model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    # The key bias of attention has no effect (it adds the same q.b_k to every logit of a softmax row): its
    # gradient is zero up to rounding, which Adam scales up to steps of up to ~lr. Compared without it.
    for name in [k for k in ours if k.endswith("attn.in_proj_bias")]:
        width = ours[name].shape[0] // 3
        ours[name], theirs[name] = (torch.cat([b[:width], b[2 * width:]]) for b in (ours[name], theirs[name]))
    moved = max((theirs[k].float() - v.float()).abs().max().item() for k, v in ours.items())
    changed = {k for k, v in ours.items() if not torch.allclose(v.float(), theirs[k].float(), rtol=1e-4, atol=1e-5)}
    assert not changed, f"{len(changed)} tensors differ (max {moved:.2e}), e.g. {sorted(changed)[:5]}"
    start = open_clip.create_model(MODEL).state_dict()  # the steps did train: BatchNorm statistics moved
    assert not torch.equal(ours["visual.trunk.bn1.running_mean"], start["visual.trunk.bn1.running_mean"])
    assert ours["logit_scale"].item() == pytest.approx(theirs["logit_scale"].item(), abs=1e-6)
    assert ours["logit_scale"].item() <= math.log(100)
