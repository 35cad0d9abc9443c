"""World size 2 (gloo) equals one process on the concatenated batch: loss values and gradients.

One spawn for the module; each worker checks every case and writes its errors to a file. Convention
checked (open_clip's local_loss): the mean over ranks of the per-rank losses is the global loss; the
DDP-averaged parameter gradients are the global gradients; a rank's input (feature) gradients are
world_size times the global loss's gradients for its rows (DDP's averaging divides that back).
"""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import medclip

WORLD = 2
ROWS = 3  # images per rank


def _concept_fields():
    """Per-rank concept fields with different C per rank, a shared CUI across ranks, an empty caption."""
    ids0 = torch.tensor([[11, 12, 13], [14, 15, 0], [16, 0, 0]])
    mask0 = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)  # [0, 2] negated
    ids1 = torch.tensor([[12, 17], [0, 0], [18, 11]])  # 12 and 11 also appear on rank 0
    mask1 = torch.tensor([[1, 1], [0, 0], [1, 1]], dtype=torch.bool)  # image 4: no concepts
    return [(ids0, mask0), (ids1, mask1)]


def _pad(t: torch.Tensor, c: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(t.shape[0], c - t.shape[1], *t.shape[2:])], dim=1)


def _max_err(a, b) -> float:
    return float((a - b).abs().max())


def _synthetic_cases(rank: int, errors: dict):
    from medclip.losses import PCAlignConfig, World, infonce_loss, pc_align_loss, sigmoid_loss
    from medclip.models.heads import ConceptHeads, ConceptHeadsConfig

    torch.manual_seed(0)  # identical replicas and data on both ranks
    d_in, wv, wt, p = 6, 5, 7, 4
    img_tower, txt_tower = torch.nn.Linear(d_in, 8), torch.nn.Linear(d_in, 8)
    heads = ConceptHeads(ConceptHeadsConfig(image_width=wv, text_width=wt, embed_dim=8))
    log_scale, bias = torch.nn.Parameter(torch.tensor(2.0)), torch.nn.Parameter(torch.tensor(-1.0))
    n = WORLD * ROWS
    x_img, x_txt = torch.randn(n, d_in), torch.randn(n, d_in)
    patch_states = torch.randn(n, p, wv)
    fields = _concept_fields()
    span_states = [torch.randn(ROWS, ids.shape[1], wt) for ids, _ in fields]
    params = [*img_tower.parameters(), *txt_tower.parameters(), *heads.parameters(), log_scale, bias]
    rows = slice(rank * ROWS, (rank + 1) * ROWS)

    # Caption keys with duplicates inside a rank (rows 0, 2) and across ranks (rows 1, 4 and 0, 5).
    all_keys = torch.tensor([7, 8, 7, 9, 8, 7])
    # Caption pools (drawn caption first) of different widths per rank: rank 0's row 1 holds caption 7 drawn
    # by rows 0, 2 and 5; rank 1's row 3 holds 7 and 8. The single-process batch pads rank 0's to width 3.
    pools = [torch.tensor([[7, 20], [8, 7], [7, 21]]), torch.tensor([[9, 7, 8], [8, 22, 22], [7, 23, 24]])]
    full_pools = torch.cat([torch.cat([pools[0], pools[0][:, :1]], dim=1), pools[1]])

    def it_loss(kind, xi, xt, world, keys=None, pool_keys=None):
        fi = F.normalize(img_tower(xi), dim=-1)
        ft = F.normalize(txt_tower(xt), dim=-1)
        if kind == "infonce":
            return infonce_loss(fi, ft, log_scale.exp(), None, world=world, pool_keys=pool_keys)
        return sigmoid_loss(fi, ft, log_scale.exp(), bias, world=world, caption_keys=keys, pool_keys=pool_keys)

    def pc_loss(cfg, ps, states, ids, mask, world):
        concepts = heads.concept_head(states)
        return pc_align_loss(heads.embed_patches(ps), concepts, mask, ids, heads.logit_scale, heads.logit_bias,
                             cfg, world=world)

    c_max = max(ids.shape[1] for ids, _ in fields)
    full_ids = torch.cat([_pad(ids, c_max) for ids, _ in fields])
    full_mask = torch.cat([_pad(m, c_max) for _, m in fields])
    full_states = torch.cat([_pad(s, c_max) for s in span_states])
    cases = {
        "it_infonce": lambda inputs, world: it_loss("infonce", *inputs, world),
        "it_sigmoid": lambda inputs, world: it_loss("sigmoid", *inputs, world),
        "it_sigmoid_same_caption": lambda inputs, world: it_loss(
            "sigmoid", *inputs, world, all_keys[rows] if world is None else all_keys),
        "it_infonce_pool": lambda inputs, world: it_loss(
            "infonce", *inputs, world, pool_keys=pools[rank] if world is None else full_pools),
        "it_sigmoid_pool": lambda inputs, world: it_loss(
            "sigmoid", *inputs, world, pool_keys=pools[rank] if world is None else full_pools),
        "pc_max_naive": lambda inputs, world: pc_loss(PCAlignConfig("max", chunk_size=None), *inputs, world),
        "pc_max_chunked": lambda inputs, world: pc_loss(PCAlignConfig("max", chunk_size=2), *inputs, world),
        "pc_topk_chunked": lambda inputs, world: pc_loss(PCAlignConfig("topk", topk=2, chunk_size=3), *inputs, world),
        "pc_lse_chunked": lambda inputs, world: pc_loss(PCAlignConfig("lse", chunk_size=2), *inputs, world),
    }
    for name, fn in cases.items():
        if name.startswith("it"):
            local_inputs = [x_img[rows].clone().requires_grad_(), x_txt[rows].clone().requires_grad_()]
            full_inputs = [x_img.clone().requires_grad_(), x_txt.clone().requires_grad_()]
            grad_rows = [rows, rows]
        else:
            ids, mask = fields[rank]
            local_inputs = [patch_states[rows].clone().requires_grad_(), span_states[rank].clone().requires_grad_(),
                            ids, mask]
            full_inputs = [patch_states.clone().requires_grad_(), full_states.clone().requires_grad_(),
                           full_ids, full_mask]
            c_local = ids.shape[1]
            grad_rows = [rows, (rows, slice(0, c_local))]
        local = fn(local_inputs, None)  # world from torch.distributed
        ref = fn(full_inputs, World.single())
        diff = [t for t in local_inputs if t.requires_grad]
        ref_diff = [t for t in full_inputs if t.requires_grad]
        g_local = torch.autograd.grad(local, params + diff, allow_unused=True)
        g_ref = torch.autograd.grad(ref, params + ref_diff, allow_unused=True)
        mean_loss = local.detach().clone()
        dist.all_reduce(mean_loss)
        errs = {"loss": _max_err(mean_loss / WORLD, ref.detach())}
        for i, (gl, gr) in enumerate(zip(g_local[:len(params)], g_ref[:len(params)])):
            gl = torch.zeros_like(params[i]) if gl is None else gl.clone()
            gr = torch.zeros_like(params[i]) if gr is None else gr
            dist.all_reduce(gl)  # DDP averages parameter gradients
            errs[f"param{i}"] = _max_err(gl / WORLD, gr)
        for i, (gl, gr, sl) in enumerate(zip(g_local[len(params):], g_ref[len(params):], grad_rows)):
            errs[f"input{i}"] = _max_err(gl / WORLD, gr[sl])
        errs["ref_loss"] = float(ref)
        errs["nonzero_grads"] = sum(int(g is not None and bool(g.abs().sum() > 0)) for g in g_ref[:len(params)])
        errors[name] = errs


def _objective_case(rank: int, errors: dict):
    """The full objective on the tiny open_clip model: tower and head parameter gradients."""
    from medclip.losses import Objective, ObjectiveConfig, World
    from medclip.models import towers
    from medclip.models.heads import ConceptHeads, ConceptHeadsConfig
    from medclip.models.loading import build_model, build_tokenizer, resolve_config

    cfg = resolve_config("medclip-tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    heads = ConceptHeads(ConceptHeadsConfig(towers.image_width(model), towers.text_width(model), 16))
    captions = ["lung nodule in the right lobe", "brain mri normal", "pleural effusion with nodule", "no findings"]
    text = build_tokenizer(cfg)(captions)
    images = torch.randn(4, 3, 64, 64)
    spans = torch.tensor([[[1, 3], [5, 7]], [[1, 3], [0, 0]], [[1, 3], [4, 5]], [[0, 0], [0, 0]]])
    ids = torch.tensor([[1, 2], [3, 0], [4, 1], [0, 0]])
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 0]], dtype=torch.bool)
    full = {"images": images, "text": text, "concept_spans": spans, "concept_ids": ids, "concept_mask": mask}
    # The same-caption case repeats rank 0's first caption as rank 1's last.
    repeated = {**full, "text": build_tokenizer(cfg)(captions[:3] + captions[:1])}
    # The pool case: rank 0's row 1 and rank 1's row 3 hold a caption the other rank's rows drew.
    keys = torch.tensor([[11, 12], [13, 21], [21, 21], [14, 11]])
    pooled = {**full, "pool_keys": keys}
    for name, it_kind, same_caption in [("infonce", "infonce", "negative"), ("sigmoid", "sigmoid", "negative"),
                                        ("sigmoid_same_caption", "sigmoid", "positive"),
                                        ("infonce_pool", "infonce", "negative")]:
        if it_kind == "sigmoid":
            torch.manual_seed(0)
            model = build_model({**cfg, "init_logit_bias": -10.0})
        params = [p for m in (model, heads) for p in m.parameters()]
        config = ObjectiveConfig(it_kind=it_kind, it_same_caption=same_caption, pc_weight=0.7, pc_chunk_size=2,
                                 it_positives="pool" if name.endswith("pool") else "own")
        batch = repeated if same_caption == "positive" else pooled if name.endswith("pool") else full
        rows = slice(rank * 2, rank * 2 + 2)
        local_batch = {k: v[rows] for k, v in batch.items()}
        local = Objective(config).compute(model, heads, local_batch, step=0)
        ref = Objective(config, world=World.single()).compute(model, heads, batch, step=0)
        errs = {}
        for key in ("total", "it", "pc"):
            value = local[key].detach().clone()
            dist.all_reduce(value)
            errs[key] = _max_err(value / WORLD, ref[key].detach())
        g_local = torch.autograd.grad(local["total"], params, allow_unused=True)
        g_ref = torch.autograd.grad(ref["total"], params, allow_unused=True)
        worst = 0.0
        for p, gl, gr in zip(params, g_local, g_ref):
            gl = torch.zeros_like(p) if gl is None else gl.clone()
            gr = torch.zeros_like(p) if gr is None else gr
            dist.all_reduce(gl)
            worst = max(worst, _max_err(gl / WORLD, gr))
        errs["params"] = worst
        errs["ref_pc"] = float(ref["pc"])
        errors[f"objective_{name}"] = errs


def _worker(rank: int, init_file: str, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    errors: dict = {}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _synthetic_cases(rank, errors)
            _objective_case(rank, errors)
        # deprecated APIs that medclip's own code calls (a deprecation warning names its caller's file)
        package = os.path.dirname(medclip.__file__) + os.sep
        errors["deprecations"] = sorted({f"{w.filename}: {w.category.__name__}: {w.message}" for w in caught
                                         if issubclass(w.category, (FutureWarning, DeprecationWarning))
                                         and w.filename.startswith(package)})
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_errors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


CASES = ["it_infonce", "it_sigmoid", "it_sigmoid_same_caption", "it_infonce_pool", "it_sigmoid_pool",
         "pc_max_naive", "pc_max_chunked", "pc_topk_chunked", "pc_lse_chunked"]


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES)
def test_world_size_two_equals_concatenated_batch(distributed_errors, case):
    for rank, errors in enumerate(distributed_errors):
        errs = errors[case]
        assert errs["ref_loss"] > 0 and errs["nonzero_grads"] >= 4
        bad = {k: v for k, v in errs.items() if k not in ("ref_loss", "nonzero_grads") and v > 1e-5}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["infonce", "sigmoid", "sigmoid_same_caption", "infonce_pool"])
def test_objective_world_size_two_equals_concatenated_batch(distributed_errors, case):
    for rank, errors in enumerate(distributed_errors):
        errs = errors[f"objective_{case}"]
        assert errs["ref_pc"] > 0
        bad = {k: v for k, v in errs.items() if k != "ref_pc" and v > 1e-5}
        assert not bad, f"rank {rank}: {bad}"


@pytest.mark.integration
@pytest.mark.distributed
def test_losses_gather_through_no_deprecated_collective(distributed_errors):
    # torch.distributed.nn.all_gather is deprecated in torch 2.14 (a FutureWarning at every call site)
    assert [errors["deprecations"] for errors in distributed_errors] == [[], []]
