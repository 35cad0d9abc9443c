"""Pretraining engine pieces that need no data stream: recipes, optimiser rules, checkpoints, attention."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

import medclip
from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt
from medclip.training.attention import KernelAttention, set_attention_backend, xformers_available
from medclip.training.config import load_recipe
from medclip.training.distributed import _first_slurm_host, detect_env
from medclip.training.optim import build_optimizer, lr_lambda, no_decay

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_shipped_recipes_load_and_validate():
    for name in ("demo", "shared_real", "unimed_vitb16", "medconcept_siglip"):
        recipe = load_recipe(REPO / "pretrain" / f"{name}.yaml")
        assert recipe.run.steps > 0
    demo = load_recipe(REPO / "pretrain" / "demo.yaml", ["optim.lr=1e-4", "run.steps=7", "data.demo=false",
                                                         "data.sources=[{manifest: m.yaml, weight: 2}]"])
    assert demo.optim.lr == 1e-4 and demo.run.steps == 7
    assert demo.data.sources[0].manifest == "m.yaml" and demo.data.sources[0].weight == 2.0


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=-1"], "optim.lr must be positive"),
    (["optim.ema_decay=1"], r"optim.ema_decay must be in \[0, 1\) \(0 or null: no EMA\), got 1.0"),
    (["optim.ema_export=true"], "optim.ema_export needs an EMA: set optim.ema_decay too"),
    (["optim.learning_rate=1"], "unknown recipe key optim.learning_rate"),
    (["model.precision=fp8"], "model.precision: 'fp8' is not one of"),
    (["run.steps=ten"], "run.steps: expected int"),
    (["objective.it_kind=cosine"], "it_kind must be one of"),
    (["data.batch_size=10", "optim.accum_steps=3"], "not divisible"),
    (["run.tensorboard=maybe"], "expected true/false"),
    (["data.first_caption_share=1.5"], r"first_caption_share must be in \[0, 1\]"),
    (["optim.beta1=2.0"], r"optim.beta1 must be in \[0, 1\), got 2.0"),
    (["optim.beta2=1"], r"optim.beta2 must be in \[0, 1\)"),
    (["optim.eps=-1"], "optim.eps must be positive"),
    (["optim.eps=0"], "optim.eps must be positive"),
    (["optim.lr=.nan"], "optim.lr must be a finite number, got nan"),
    (["optim.lr=.inf"], "optim.lr must be a finite number, got inf"),
    (["optim.weight_decay=.nan"], "optim.weight_decay must be a finite number"),
    (["optim.grad_clip=.nan"], "optim.grad_clip must be a finite number"),
    (["optim.grad_clip=-1"], "optim.grad_clip must not be negative"),
    (["optim.logit_scale_max=.nan"], "optim.logit_scale_max must be a finite number"),
    (["optim.min_lr=1"], "optim.min_lr .* is above optim.lr"),
    (["objective.pc_weight=.nan"], "objective.pc_weight must be a finite number"),
    (["objective.pc_lse_temperature=.inf"], "objective.pc_lse_temperature must be a finite number"),
    (["data.sources=[{manifest: m.yaml, weight: .nan}]"], r"data.sources\[0\].weight must be a finite number"),
    (["run.steps=.inf"], "run.steps: expected int, got inf"),
    (["run.max_nonfinite_steps=0"], "run.max_nonfinite_steps must be positive"),
    (["data.batch_size=[1"], r"--set data.batch_size: '\[1' is not a valid value \(expected ',' or '\]'"),
    (["model.name=!!python/object/apply:os.system [touch x]"], "--set model.name: YAML tags .* are not accepted"),
    (["data.sources=[!!python/name:os.system x]"], "--set data.sources: .* is not a valid value"),
])
def test_bad_recipe_values_are_one_clear_error(overrides, message):
    with pytest.raises(MedclipError, match=message):
        load_recipe(REPO / "pretrain" / "demo.yaml", overrides)


def test_bad_recipe_is_one_line_from_the_cli():
    proc = subprocess.run([sys.executable, "-m", "medclip", "pretrain", "--config", "pretrain/demo.yaml",
                           "--set", "optim.betas=1"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "medclip: error: unknown recipe key optim.betas (valid keys here: accum_steps, beta1, beta2, ema_decay, "
        "ema_export, ema_warmup, eps, grad_clip, logit_scale_max, lr, min_lr, schedule, warmup_steps, weight_decay)"]


def test_a_missing_recipe_is_one_line(tmp_path, capsys):
    from medclip.cli import main

    assert main(["pretrain", "--config", str(tmp_path / "x.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclip: error: recipe not found"), err


@pytest.mark.parametrize("override", ["data.batch_size=[1", "run.steps=.inf", "optim.beta1=2.0", "optim.eps=-1",
                                      "objective.pc_weight=.nan", "model.name=!!python/object/apply:os.system [true]"])
def test_bad_set_values_are_one_line_from_the_cli(override, capsys):
    from medclip.cli import main

    assert main(["pretrain", "--config", str(REPO / "pretrain" / "demo.yaml"), "--set", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medclip: error: ") and override.split("=")[0] in err[0]


def test_text_values_from_the_command_line_are_taken_as_written():
    recipe = load_recipe(REPO / "pretrain" / "demo.yaml", ["eval.root={output_dir}/demo_data", "run.output_dir=2024",
                                                           "model.checkpoint=null"])
    assert recipe.eval.root == "{output_dir}/demo_data" and recipe.run.output_dir == "2024"
    assert recipe.model.checkpoint is None


def test_no_weight_decay_on_norms_biases_and_scales():
    model = medclip.load("medclip-tiny-bert").model
    decayed = {n for n, p in model.named_parameters() if not no_decay(n, p)}
    assert "logit_scale" not in decayed
    assert not any("bias" in n or "LayerNorm" in n or ".ln_" in n or n.startswith("ln_") for n in decayed)
    assert "visual.conv1.weight" in decayed and "visual.proj" in decayed
    assert any(n.startswith("text.transformer.encoder.layer.0.attention.self.query.weight") for n in decayed)
    from medclip.training.config import OptimConfig

    opt = build_optimizer(model.named_parameters(), OptimConfig(weight_decay=0.2))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["medclip-small-resnet18", "medclip-small", "medclip-tiny"])
def test_weight_decay_sets_equal_open_clip_trains(name):
    """Engine parity (bench/engine_parity.py): the parameters without weight decay are open_clip_train's own
    (its main.py: ``p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n``)."""
    model = medclip.load(name).model
    theirs = {n for n, p in model.named_parameters()
              if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    assert {n for n, p in model.named_parameters() if no_decay(n, p)} == theirs


def test_schedule_equals_open_clip_trains_cosine():
    """Engine parity: the lr of every step is open_clip_train's cosine_lr (linear warmup, cosine to 0)."""
    from open_clip_train.scheduler import cosine_lr

    from medclip.training.config import OptimConfig

    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    theirs = cosine_lr(optimizer, 1e-3, warmup_length=50, steps=240)
    ours = lr_lambda(OptimConfig(lr=1e-3, warmup_steps=50), total_steps=240)
    for step in range(240):
        assert 1e-3 * ours(step) == pytest.approx(theirs(step), rel=1e-9, abs=1e-15)


def test_warmup_then_cosine_schedule():
    from medclip.training.config import OptimConfig

    f = lr_lambda(OptimConfig(lr=1.0, warmup_steps=10, min_lr=0.1), total_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_env_detection_torchrun_and_slurm():
    assert detect_env({}).world_size == 1
    tr = detect_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (tr.rank, tr.world_size, tr.local_rank, tr.launcher) == (3, 8, 1, "torchrun")
    sl = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1"})
    assert (sl.rank, sl.world_size, sl.local_rank, sl.launcher) == (5, 16, 1, "slurm")
    assert _first_slurm_host("gpu[07-09,12],cpu1") == "gpu07"
    assert _first_slurm_host("node3") == "node3"


def test_atomic_checkpoint_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = ckpt.checkpoint_dir(tmp_path) / "step_1.pt"
    ckpt.save_atomic({"step": 1, "model": {"w": torch.ones(3)}}, path)

    def crash(obj, fh):
        fh.write(b"partial bytes")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_atomic({"step": 2, "model": {"w": torch.zeros(3)}}, ckpt.checkpoint_dir(tmp_path) / "step_2.pt")
    monkeypatch.undo()
    assert [p.name for p in ckpt.checkpoint_dir(tmp_path).iterdir()] == ["step_1.pt"]  # no temp left, no step_2
    assert ckpt.resolve_resume("latest", tmp_path) == path
    assert torch.equal(ckpt.read_checkpoint(path)["model"]["w"], torch.ones(3))


def test_rotation_keeps_the_last_n(tmp_path):
    for step in (5, 10, 15, 20):
        ckpt.save_atomic({"step": step, "model": {}}, ckpt.checkpoint_dir(tmp_path) / f"step_{step}.pt")
        ckpt.rotate(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_15.pt", "step_20.pt"]


def test_rng_state_round_trip_is_weights_only_safe(tmp_path):
    import random

    import numpy as np

    state = ckpt.rng_state()
    ckpt.save_atomic({"rng": state, "step": 0, "model": {}}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    ckpt.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


@pytest.mark.parametrize("backend", ["sdpa", "math"] + (["xformers"] if xformers_available() else []))
def test_attention_backends_match_plain_attention(backend):
    torch.manual_seed(0)
    encoder = medclip.load("medclip-tiny")
    images, text = torch.randn(2, 3, 64, 64), encoder.tokenize(["a chest x-ray", "brain mri"])
    with torch.no_grad():
        ref_img, ref_txt = encoder.model.encode_image(images), encoder.model.encode_text(text)
    switched = set_attention_backend(encoder.model, backend)
    assert switched == 6  # 3 image + 3 text blocks
    assert all(isinstance(m, KernelAttention) for m in encoder.model.modules() if isinstance(m, nn.MultiheadAttention))
    with torch.no_grad():
        torch.testing.assert_close(encoder.model.encode_image(images), ref_img, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(encoder.model.encode_text(text), ref_txt, atol=1e-5, rtol=1e-5)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in encoder.model.state_dict()


def test_xformers_backend_without_xformers_is_a_clear_error():
    if xformers_available():
        pytest.skip("xformers is installed here")
    with pytest.raises(MedclipError, match="gpu' extra"):
        set_attention_backend(medclip.load("medclip-tiny").model, "xformers")


def test_hf_text_tower_gradient_checkpointing_takes_effect():
    model = medclip.load("medclip-tiny-bert").model.train()
    model.set_grad_checkpointing(True)
    assert model.text.transformer.is_gradient_checkpointing
    assert model.visual.transformer.grad_checkpointing
    ids = torch.randint(5, 100, (2, 16))
    loss = model.encode_text(ids).sum() + model.encode_image(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.text.transformer.encoder.parameters() if p.requires_grad)
    assert math.isfinite(loss.item())


def test_the_declared_torch_floor_has_the_engines_apis():
    """FSDP2's public `torch.distributed.fsdp.fully_shard` and `torch.nn.utils.get_total_norm` /
    `clip_grads_with_norm_` (the divergence guard's grad norm) arrived in torch 2.6."""
    import configparser
    import re

    from torch.distributed.fsdp import fully_shard  # noqa: F401

    requires = configparser.ConfigParser()
    requires.read(REPO / "setup.cfg")
    floor = re.search(r"^torch>=([\d.]+)$", requires["options"]["install_requires"], re.M).group(1)
    assert tuple(int(x) for x in floor.split(".")[:2]) >= (2, 6)
    assert callable(torch.nn.utils.get_total_norm) and callable(torch.nn.utils.clip_grads_with_norm_)
