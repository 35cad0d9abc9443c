"""The EMA of the weights (optim.ema_decay): what it averages and how, its state in and out of a checkpoint,
and, in a whole run, a resume from a checkpoint of a run that kept none. Resumed bit for bit after a SIGKILL
with 2 processes x 2 workers: test_rehearsal.py; under FSDP2: test_training_distributed.py."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_helpers import FixedStream, make_batch, recipe
from torch import nn

from medclip.errors import MedclipError
from medclip.training.ema import WeightEma
from medclip.training.trainer import Pretrainer


def small_module() -> nn.Module:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    module[2].weight.requires_grad_(False)  # frozen: no shadow
    module.register_buffer("causal_mask", torch.full((2, 2), float("-inf")), persistent=False)  # a constant
    return module


def train_a_little(module: nn.Module, ema: WeightEma, steps: int, seed: int = 1) -> None:
    """Steps that move the weights and the BatchNorm statistics, each followed by an EMA update."""
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        module(torch.randn(8, 3, generator=g)).square().mean().backward()
        optimizer.step()
        ema.update()


def test_ema_averages_trainable_weights_and_running_statistics_with_the_warmup_rule():
    module = small_module()
    ema = WeightEma(module, decay=0.9)
    assert ema.names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.bias", "1.running_mean", "1.running_var"]
    expected = [s.clone() for s in ema.shadows]
    g = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
    for n in range(12):
        optimizer.zero_grad()
        module(torch.randn(8, 3, generator=g)).square().mean().backward()
        optimizer.step()
        decay = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.18, ... then 0.9 from the 71st update on
        assert ema.current_decay() == pytest.approx(decay)
        ema.update()
        weights = dict(module.state_dict(keep_vars=True))
        expected = [decay * e + (1 - decay) * weights[name].detach() for e, name in zip(expected, ema.names)]
    for got, want, name in zip(ema.shadows, expected, ema.names):
        torch.testing.assert_close(got, want, msg=name)
    assert ema.updates == 12 and not torch.equal(ema.shadows[0], module[0].weight)

    raw = module[0].weight.detach().clone()
    with ema.applied_to():
        assert torch.equal(module[0].weight, ema.shadows[0]) and torch.equal(module[1].running_mean, ema.shadows[5])
    assert torch.equal(module[0].weight, raw)


def test_ema_state_loads_exactly_into_the_ema_of_a_fresh_module():
    """What a resume does: the checkpoint's shadows and update count, not the new module's weights."""
    trained = small_module()
    ema = WeightEma(trained, decay=0.95)
    train_a_little(trained, ema, steps=5)
    state = ema.state_dict()

    fresh = small_module()
    train_a_little(fresh, WeightEma(fresh, 0.95), steps=2, seed=2)  # other weights than the checkpoint's
    restored = WeightEma(fresh, decay=0.95)
    restored.load_state_dict(state)
    assert restored.updates == 5
    for got, want, name in zip(restored.shadows, ema.shadows, ema.names):
        assert torch.equal(got, want), name
    fresh.load_state_dict(trained.state_dict())  # the resumed weights: both EMAs continue alike
    ema.update()
    restored.update()
    assert all(torch.equal(a, b) for a, b in zip(restored.shadows, ema.shadows))


def test_an_ema_over_other_tensors_is_one_clear_error():
    module = small_module()
    state = WeightEma(module, 0.9).state_dict()
    module[2].weight.requires_grad_(True)  # the recipe now trains a tensor the checkpoint's EMA did not average
    with pytest.raises(MedclipError, match=r"EMA covers other tensors .* first 2\.weight"):
        WeightEma(module, 0.9).load_state_dict(state)


@pytest.mark.integration
def test_resuming_a_checkpoint_without_an_ema_starts_the_ema_from_its_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="medclip.training.state")
    out, batch = tmp_path / "run", make_batch(8)
    Pretrainer.from_recipe(recipe(out, "run.steps=3"), data=FixedStream(batch)).run()
    resumed = Pretrainer.from_recipe(recipe(out, "run.steps=5", "optim.ema_decay=0.9"), resume="latest",
                                     data=FixedStream(batch))
    assert resumed.step == 3 and resumed.ema.updates == 0
    weights = dict(resumed.module.state_dict())
    for name, shadow in zip(resumed.ema.names, resumed.ema.shadows):
        assert torch.equal(shadow, weights[name]), name
    assert "holds no EMA of the weights; the EMA starts from its weights" in caplog.text
    resumed.run()
    final = torch.load(out / "checkpoints" / "step_5.pt", weights_only=True)
    assert final["ema"]["updates"] == 2 and final["ema"]["decay"] == 0.9
