"""Peak memory and time of PC-Align (naive vs chunked) against IT-Align, batch 32..512.

196 patches (ViT-B/16 at 224 px) and 8 concepts per caption. Every case runs in a fresh
subprocess (after a warm-up step at batch 4); its peak is the high-water RSS (getrusage ru_maxrss)
minus the RSS just before the measured step (torch's CPU allocations are invisible to tracemalloc).

Two levels, both printed:
  loss  -- the loss alone on given embeddings (IT: image/text [B, 512]; PC: patches [B, 196, 512] and
           concepts [B, 8, 512]); the figure is the extra memory of forward + backward (intermediates
           and input gradients). PC's inputs are 196x larger than IT's, so the ratio here is bounded
           below by the input gradient alone; chunking only removes the B x P x N term.
  step  -- one training step (both towers forward + loss + backward) of a small open_clip ViT with
           196 patches (112 px, patch 8) through medclip.losses.Objective: IT-Align only, versus
           IT + PC-Align naive / chunked. This is the ratio the goal refers to (<= 2x at batch 512):
           what turning PC-Align on costs in a training step.

    .venv/bin/python bench/loss_memory.py            # batches 32 64 128 256 512
    .venv/bin/python bench/loss_memory.py --quick    # batches 32 128
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

PATCHES = 196
CONCEPTS_PER_CAPTION = 8
EMBED_DIM = 512
STEP_MODEL = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 112, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 64, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CHUNK = 64


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _loss_case(kind: str, batch: int):
    import torch

    from medclip.losses import PCAlignConfig, World, infonce_loss, pc_align_loss

    world = World.single()
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):  # filled in place: no transient copy raises the high-water mark before the step
        return torch.empty(*shape).normal_(generator=gen).requires_grad_()

    scale = torch.tensor(2.659, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    if kind == "it":
        image, text = leaf(batch, EMBED_DIM), leaf(batch, EMBED_DIM)

        def step():
            loss = infonce_loss(torch.nn.functional.normalize(image, dim=-1),
                                torch.nn.functional.normalize(text, dim=-1), scale.exp(), None, world)
            loss.backward()
    else:
        patches = leaf(batch, PATCHES, EMBED_DIM)
        concepts = leaf(batch, CONCEPTS_PER_CAPTION, EMBED_DIM)
        mask = torch.ones(batch, CONCEPTS_PER_CAPTION, dtype=torch.bool)
        ids = torch.randint(0, 4 * batch, (batch, CONCEPTS_PER_CAPTION), generator=gen)
        cfg = PCAlignConfig("max", chunk_size=None if kind == "pc_naive" else CHUNK)

        def step():
            pc_align_loss(patches, concepts, mask, ids, scale, bias, cfg, world).backward()
    return step


def _step_case(kind: str, batch: int):
    import torch

    from medclip.losses import Objective, ObjectiveConfig, World
    from medclip.models import towers
    from medclip.models.heads import ConceptHeads, ConceptHeadsConfig
    from medclip.models.loading import build_model

    torch.manual_seed(0)
    model = build_model(STEP_MODEL).train()
    heads = None
    if kind != "it":
        heads = ConceptHeads(ConceptHeadsConfig(towers.image_width(model), towers.text_width(model),
                                                STEP_MODEL["embed_dim"]))
    ctx = STEP_MODEL["text_cfg"]["context_length"]
    text = torch.randint(1, 49406, (batch, ctx))
    text[:, 0], text[:, ctx - 1] = 49406, 49407
    starts = torch.randint(1, ctx - 4, (batch, CONCEPTS_PER_CAPTION, 1))
    batch_dict = {
        "images": torch.empty(batch, 3, 112, 112).normal_(),
        "text": text,
        "concept_spans": torch.cat([starts, starts + torch.randint(1, 4, starts.shape)], dim=-1),
        "concept_ids": torch.randint(0, 4 * batch, (batch, CONCEPTS_PER_CAPTION)),
        "concept_mask": torch.ones(batch, CONCEPTS_PER_CAPTION, dtype=torch.bool),
    }
    config = ObjectiveConfig(pc_weight=0.0 if kind == "it" else 1.0,
                             pc_chunk_size=None if kind == "pc_naive" else CHUNK)
    objective = Objective(config, world=World.single())

    def step():
        objective.compute(model, heads, batch_dict, step=0)["total"].backward()
        model.zero_grad(set_to_none=True)
        if heads is not None:
            heads.zero_grad(set_to_none=True)
    return step


def worker(level: str, kind: str, batch: int, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    make = _loss_case if level == "loss" else _step_case
    make(kind, 4)()  # warm-up at batch 4: lazy library set-up and thread pools are not the loss's memory
    step = make(kind, batch)
    before = _rss_bytes()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mb": max(0, _peak_bytes() - before) / 2**20, "time_s": min(times)}


def _fmt(r: dict, key: str, width: int) -> str:
    return f"{r[key]:>{width}.{1 if key == 'peak_mb' else 3}f}" if key in r else f"{'-':>{width}}"


def _ratio(res: dict, kind: str) -> str:
    ok = "peak_mb" in res[kind] and res["it"].get("peak_mb")
    return f"{res[kind]['peak_mb'] / res['it']['peak_mb']:>9.2f}" if ok else f"{'-':>9}"


def run_case(level: str, kind: str, batch: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", level, kind, str(batch), str(repeats)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batches 32 and 128 only")
    parser.add_argument("--batches", type=int, nargs="+", help="batch sizes (default 32 64 128 256 512)")
    parser.add_argument("--naive-max", type=int, default=512,
                        help="skip naive PC-Align above this batch (it needs ~B x 196 x 8B x 4 bytes x 4)")
    parser.add_argument("--levels", nargs="+", default=["loss", "step"], choices=["loss", "step"])
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        level, kind, batch, repeats = args.worker
        print(json.dumps(worker(level, kind, int(batch), int(repeats))))
        return 0
    batches = args.batches or ([32, 128] if args.quick else [32, 64, 128, 256, 512])
    print(f"patches={PATCHES} concepts/caption={CONCEPTS_PER_CAPTION} chunk={CHUNK} "
          f"loss embed dim={EMBED_DIM}; step model: ViT 112px/8 (196 patches), width 64, 2+2 layers")
    for level in args.levels:
        print(f"\n== {level}: peak MB above the pre-step RSS, time s (min of repeats)")
        print(f"{'batch':>6} {'IT MB':>9} {'IT s':>7} {'PCnaive MB':>11} {'PCnaive s':>10} "
              f"{'PCchunk MB':>11} {'PCchunk s':>10} {'chunk/IT':>9} {'naive/IT':>9}")
        for batch in batches:
            repeats = 2 if batch <= 128 else 1
            res = {kind: run_case(level, kind, batch, repeats) for kind in ("it", "pc_chunked")}
            res["pc_naive"] = (run_case(level, "pc_naive", batch, repeats) if batch <= args.naive_max
                               else {"error": "skipped"})

            print(f"{batch:>6} {_fmt(res['it'], 'peak_mb', 9)} {_fmt(res['it'], 'time_s', 7)} "
                  f"{_fmt(res['pc_naive'], 'peak_mb', 11)} {_fmt(res['pc_naive'], 'time_s', 10)} "
                  f"{_fmt(res['pc_chunked'], 'peak_mb', 11)} {_fmt(res['pc_chunked'], 'time_s', 10)} "
                  f"{_ratio(res, 'pc_chunked')} {_ratio(res, 'pc_naive')}", flush=True)
            for kind, r in res.items():
                if "error" in r and r["error"] != "skipped":
                    print(f"       {kind}: {r['error']}")
    print("\nstep ratios compare a whole training step with PC-Align on against IT-Align only "
          "(goal: chunk/IT <= 2 at batch 512).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
