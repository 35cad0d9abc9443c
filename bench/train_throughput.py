"""Training throughput and peak memory: medclip IT-only, medclip IT+PC, open_clip_train's own step.

All three cases train the same architecture (``--model``, default medclip-small: 6x256 ViT at 128 px,
4x256 text tower) at the same batch size with the same AdamW settings (lr, betas, eps, weight decay
on matrices only) and warmup+cosine schedule, on the SAME pre-decoded batches: MedPix train captions
(../shared/data/medpix) annotated with MeSH concepts by medclip's dictionary annotator, written to
shards by medclip.data.builder and read back through medclip.data.stream (train transform,
tokenization with concept token spans). The batches are decoded once, saved, and every case loads
them into memory, so data loading is excluded from every figure.

  medclip IT-only    Pretrainer.train_step with objective.pc_weight=0 (InfoNCE IT-Align)
  medclip IT+PC      Pretrainer.train_step with objective.pc_weight=0.5 (PC-Align on the real spans)
  open_clip_train    open_clip_train.train.train_one_epoch with open_clip's ClipLoss, the model from
                     open_clip.create_model(--model, output_dict=True), fed a DataLoader-like
                     iterable over the same (images, text) tensors; step times are taken between
                     consecutive batch requests (its last step, which logs, is not counted).

Speed: the machine is shared, so the three cases' steps are alternated inside one fresh process:
open_clip_train's train_one_epoch drives the loop, and its dataloader runs the two medclip steps
around each of its own steps on the same batch, rotating the order every step. ``--warmup`` steps of
each case are not timed; the table reports the median over ``--rounds`` x ``--steps`` steps per case,
and the ratios also as the median of step-paired ratios. Memory: each case then runs alone in a fresh
subprocess (clean figures). CPU: peak RSS (getrusage ru_maxrss), and that peak minus the RSS just
before the first step (model, batches and interpreter excluded; gradients, optimizer state and
activations included). GPU: torch.cuda.max_memory_allocated.

When a goal is missed (or with --profile), each case is profiled with torch.profiler and the
phases of one step (forward, loss, backward, optimizer) are timed separately.

    .venv/bin/python bench/train_throughput.py            # medclip-small, batch 64, 2 runs x 6 timed steps
    .venv/bin/python bench/train_throughput.py --quick    # 1 run x 3 timed steps

Options for other settings (bench/gpu_check.py drives them): ``--precision amp_bf16``, ``--attention
xformers``, ``--compile`` (medclip: model.compile; open_clip_train: torch.compile of its model, as its
--torchcompile), ``--model-config FILE`` (an open_clip JSON config registered under its file name, e.g. a
BiomedBERT-shaped HF text tower in a local directory), ``--synthetic`` (random pixels and token ids with
concept spans instead of MedPix: needs no data, measures the step only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
CASES = ("medclip_it", "medclip_itpc", "open_clip_train")
LABELS = {"medclip_it": "medclip IT-only", "medclip_itpc": "medclip IT+PC (pc_weight=0.5)",
          "open_clip_train": "open_clip_train (ClipLoss)"}
PC_WEIGHT = 0.5
# One optimizer setting for every case (open_clip_train's defaults for ViT: betas 0.9/0.98, eps 1e-6).
LR, WD, BETA1, BETA2, EPS, WARMUP = 5e-4, 0.2, 0.9, 0.98, 1e-6, 10


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------- batches

def prepare_batches(model_name: str, batch_size: int, n_batches: int, out_file: Path, work: Path) -> dict:
    """Annotate MedPix captions, build shards, stream ``n_batches`` training batches, save them."""
    import torch
    from open_clip.transform import PreprocessCfg, image_transform_v2

    import medclip
    from medclip.concepts.annotator import ConceptAnnotator
    from medclip.concepts.vocab import load_vocabulary
    from medclip.data.builder import BuildConfig, build_shards, read_table
    from medclip.data.manifest import Manifest
    from medclip.data.stream import StreamConfig, build_train_stream

    annotator = ConceptAnnotator(load_vocabulary(SHARED / "vocab" / "mesh_anatomy_disease.tsv"))
    records = []
    for rec in read_table(SHARED / "medpix" / "train.jsonl"):
        if hasattr(rec, "captions") and rec.captions:
            rec.concepts = annotator.annotate(rec.captions[0])
        records.append(rec)
    needed = min(len(records), (n_batches + 1) * batch_size)  # slack for skipped samples
    shard_dir = work / "shards"
    report = build_shards(records[:needed], BuildConfig(shard_dir, prefix="medpix", max_samples=500, processes=2))
    encoder = medclip.load(model_name)
    transform = image_transform_v2(PreprocessCfg(**encoder.preprocess_cfg), is_train=True)
    manifest = Manifest("medpix-bench", [str(p) for p in sorted(shard_dir.glob("*.tar"))], caption_fields=["captions"])
    options = {"drop_last": True, "shuffle_buffer": 200}
    if "uint8_images" in {f.name for f in dataclasses.fields(StreamConfig)}:
        options["uint8_images"] = False  # float, normalised batches: what a training step consumes
    stream = build_train_stream([manifest], encoder.tokenizer, transform, batch_size, num_workers=0, **options)
    batches = []
    for batch in stream:
        batches.append({k: v for k, v in batch.items() if k != "keys"})
        if len(batches) == n_batches:
            break
    if not batches:
        raise SystemExit("no complete batch could be built from the MedPix shards")
    if batches[0]["images"].dtype != torch.float32:
        raise SystemExit(f"the stream yields {batches[0]['images'].dtype} images; this bench needs float batches")
    torch.save(batches, out_file)
    valid = [int(b["concept_mask"].sum()) for b in batches]
    return {"samples": report.samples, "batches": len(batches), "concepts_per_batch": statistics.median(valid),
            "max_concepts_per_caption": max(int(b["concept_mask"].shape[1]) for b in batches),
            "captions_with_concepts": statistics.median(
                float(b["concept_mask"].any(1).float().mean()) for b in batches)}


def synthetic_batches(model_name: str, batch_size: int, n_batches: int, out_file: Path) -> dict:
    """Random normalised pixels and token ids (the model's input size, context and vocabulary) with one
    concept span per caption: the step's cost without any data."""
    import torch

    from medclip.models.loading import resolve_config

    cfg = resolve_config(model_name)
    size = cfg["vision_cfg"].get("image_size", 224)
    size = (size, size) if isinstance(size, int) else tuple(size)
    text = cfg.get("text_cfg", {})
    context = text.get("context_length", 77)
    if text.get("hf_model_name"):
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(text["hf_model_name"]).vocab_size
    else:
        vocab = text.get("vocab_size", 49408)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(5, vocab - 1, (batch_size, context), generator=g)  # full-length captions, no padding
        batches.append({"images": torch.randn(batch_size, 3, *size, generator=g), "text": ids,
                        "concept_spans": torch.tensor([[[1, 3]]] * batch_size),
                        "concept_ids": torch.randint(1, 10**6, (batch_size, 1), generator=g),
                        "concept_mask": torch.ones(batch_size, 1, dtype=torch.bool)})
    torch.save(batches, out_file)
    return {"samples": batch_size * n_batches, "batches": n_batches, "concepts_per_batch": batch_size,
            "max_concepts_per_caption": 1, "captions_with_concepts": 1.0}


def register_model_config(path: str | None) -> None:
    """Make --model-config's architecture known to open_clip (and so to medclip) in this process."""
    if path:
        import open_clip

        import medclip

        medclip.register_model_configs()  # medclip's own configs first
        open_clip.add_model_config(path)


# ----------------------------------------------------------------------------------------- cases

class TimedBatches:
    """What train_one_epoch reads as ``data['train'].dataloader``: records when each batch is asked for."""

    def __init__(self, batches: list, n: int, sync):
        self.batches, self.n, self.sync = batches, n, sync
        self.num_batches, self.num_samples = n, n * len(batches[0][0])
        self.times: list[float] = []

    def __iter__(self):
        for i in range(self.n):
            self.sync()
            self.times.append(time.perf_counter())
            yield self.batches[i % len(self.batches)]
        self.sync()
        self.times.append(time.perf_counter())


def _build_medclip(args, pc_weight: float, output_dir: str):
    from medclip.training.config import load_recipe
    from medclip.training.trainer import Pretrainer

    total = args.warmup + args.steps + 1
    recipe = load_recipe(None, [
        f"run.output_dir={output_dir}", "data.demo=true", f"data.batch_size={args.batch_size}",
        f"model.name={args.model}", "run.progress=false", "run.tensorboard=false", f"run.steps={total}",
        f"objective.pc_weight={pc_weight}", f"optim.lr={LR}", f"optim.weight_decay={WD}", f"optim.beta1={BETA1}",
        f"optim.beta2={BETA2}", f"optim.eps={EPS}", f"optim.warmup_steps={WARMUP}", f"run.device={args.device}",
        f"model.precision={args.precision}", f"model.attention={args.attention}", f"model.compile={args.compile}"])
    return Pretrainer.from_recipe(recipe, data=[])  # batches are fed to train_step directly


def _build_open_clip(args, device):
    import open_clip
    import torch
    from open_clip_train.scheduler import cosine_lr

    import medclip

    medclip.register_model_configs()  # the medclip-* architectures, for open_clip.create_model

    # Random weights on both sides: an HF text tower must not look for its base weights (medclip builds it from its config).
    model = open_clip.create_model(args.model, device=device, output_dict=True, pretrained_text=False)
    if args.compile:  # what open_clip_train's --torchcompile does
        model = torch.compile(model)
    # open_clip_train.main's parameter groups: no decay on gains, biases and the logit scale.
    named = list(model.named_parameters())

    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    groups = [{"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
              {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": WD}]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(BETA1, BETA2), eps=EPS)
    total = args.warmup + args.steps + 1
    scheduler = cosine_lr(optimizer, LR, WARMUP, total)
    loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    train_args = SimpleNamespace(device=str(device), precision=args.precision, distill=False, accum_freq=1,
                                 skip_scheduler=False, horovod=False, grad_clip_norm=None,
                                 log_every_n_steps=10**9, batch_size=args.batch_size, world_size=1, rank=0,
                                 local_rank=0, wandb=False, save_logs=False)
    return model, optimizer, scheduler, loss, train_args


def run_case(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    batches = torch.load(args.batches, weights_only=True)
    n = args.warmup + args.steps + 1  # the extra last step is not timed (open_clip_train logs after it)
    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "open_clip_train":
            from open_clip_train.train import train_one_epoch

            model, optimizer, scheduler, loss, train_args = _build_open_clip(args, device)
            pairs = [(b["images"], b["text"]) for b in batches]
            loader = TimedBatches(pairs, n, sync)
            baseline = _rss_bytes()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            # open_clip_train.data.DataInfo's interface (that module needs pandas, only for its CSV dataset).
            data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda epoch: None)}
            train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, train_args)
            times = loader.times
        else:
            trainer = _build_medclip(args, PC_WEIGHT if args.case == "medclip_itpc" else 0.0, tmp)
            device_batches = [{k: v.to(trainer.device) for k, v in b.items()} for b in batches]
            baseline = _rss_bytes()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            times = []
            for i in range(n):
                sync()
                times.append(time.perf_counter())
                trainer.train_step(device_batches[i % len(device_batches)])
            sync()
            times.append(time.perf_counter())
    steps = [b - a for a, b in zip(times, times[1:])][args.warmup:args.warmup + args.steps]
    result = {"case": args.case, "step_times": steps, "median_step": statistics.median(steps),
              "peak_rss": _peak_rss_bytes(), "baseline_rss": baseline, "device": device.type,
              "threads": torch.get_num_threads()}
    if cuda:
        result["cuda_peak"] = torch.cuda.max_memory_allocated()
    return result


class InterleavedBatches:
    """train_one_epoch's dataloader that runs the medclip steps between open_clip_train's steps.

    Each batch request of train_one_epoch ends its previous step, so open_clip_train's step i is the
    time from yielding batch i to the next request. Around it, the two medclip trainers take their step
    i on the same batch; the order of the three steps rotates with i, so load changes on the shared
    machine hit every case alike.
    """

    def __init__(self, batches: list, n: int, trainers: dict, sync):
        self.batches, self.n, self.trainers, self.sync = batches, n, trainers, sync
        self.num_batches, self.num_samples = n, n * len(batches[0]["images"])
        self.times: dict[str, list[float]] = {c: [] for c in CASES}

    def _medclip_steps(self, cases, batch):
        for case in cases:
            self.sync()
            t = time.perf_counter()
            self.trainers[case].train_step(batch)
            self.sync()
            self.times[case].append(time.perf_counter() - t)

    def __iter__(self):
        for i in range(self.n):
            batch = self.batches[i % len(self.batches)]
            order = CASES[i % 3:] + CASES[:i % 3]
            k = order.index("open_clip_train")
            self._medclip_steps(order[:k], batch)
            self.sync()
            t = time.perf_counter()
            yield batch["images"], batch["text"]
            self.sync()  # resumed: train_one_epoch finished its step and asks for the next batch
            self.times["open_clip_train"].append(time.perf_counter() - t)
            self._medclip_steps(order[k + 1:], batch)


def run_interleaved(args) -> dict:
    """The three cases' steps alternated in one process (speed only; memory comes from run_case)."""
    import torch
    from open_clip_train.train import train_one_epoch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    batches = [{k: v.to(device) for k, v in b.items()} for b in torch.load(args.batches, weights_only=True)]
    n = args.warmup + args.steps + 1  # the last step is not timed (open_clip_train logs after it)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {"medclip_it": _build_medclip(args, 0.0, f"{tmp}/it"),
                    "medclip_itpc": _build_medclip(args, PC_WEIGHT, f"{tmp}/itpc")}
        model, optimizer, scheduler, loss, train_args = _build_open_clip(args, device)
        loader = InterleavedBatches(batches, n, trainers, sync)
        data = {"train": SimpleNamespace(dataloader=loader, set_epoch=lambda epoch: None)}
        train_one_epoch(model, data, loss, 0, optimizer, None, scheduler, None, train_args)
    return {c: loader.times[c][args.warmup:args.warmup + args.steps] for c in CASES}


# ----------------------------------------------------------------------------------------- profiling

def profile_case(args) -> dict:
    """Phase times (forward, loss, backward, optimizer) of one step, and torch.profiler's top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batches = torch.load(args.batches, weights_only=True)
    phases: dict[str, list[float]] = {}

    def timed(name, fn):
        with record_function(f"## {name}"):
            t = time.perf_counter()
            out = fn()
            phases.setdefault(name, []).append(time.perf_counter() - t)
        return out

    with tempfile.TemporaryDirectory() as tmp:
        if args.case == "open_clip_train":
            import math as _math

            model, optimizer, scheduler, loss_fn, _ = _build_open_clip(args, torch.device("cpu"))
            model.train()

            def step(i, b):  # the body of open_clip_train.train.train_one_epoch (fp32, accum_freq=1)
                scheduler(i)
                optimizer.zero_grad()
                out = timed("forward", lambda: model(b["images"], b["text"]))
                losses = timed("loss", lambda: loss_fn(**out, output_dict=True))
                total = sum(losses.values())
                timed("backward", total.backward)

                def update():
                    optimizer.step()
                    with torch.no_grad():
                        model.logit_scale.clamp_(0, _math.log(100))
                timed("optimizer", update)
        else:
            trainer = _build_medclip(args, PC_WEIGHT if args.case == "medclip_itpc" else 0.0, tmp)

            def step(i, b):  # Pretrainer.backward + update, split into phases (accum_steps=1, fp32)
                trainer.optimizer.zero_grad(set_to_none=True)
                feats = timed("forward", lambda: trainer.wrapped(b, trainer.step))
                losses = timed("loss", lambda: trainer.module.losses(feats, trainer.step))
                timed("backward", losses["total"].backward)
                timed("optimizer", trainer.update)

        for i in range(args.warmup):
            step(i, batches[i % len(batches)])
        phases.clear()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(args.steps):
                step(args.warmup + i, batches[i % len(batches)])
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
    return {"case": args.case, "phases": {k: statistics.median(v) for k, v in phases.items()}, "table": table}


# ----------------------------------------------------------------------------------------- driver

def _child(case: str, args, batches: Path, mode: str, steps: int | None = None) -> dict:
    out = batches.parent / f"{case}-{mode}-{time.monotonic_ns()}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", case, "--batches", str(batches),
           "--out", str(out), "--model", args.model, "--batch-size", str(args.batch_size),
           "--steps", str(steps or args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device, "--profile-rows", str(args.profile_rows),
           "--precision", args.precision, "--attention", args.attention]
    cmd += ["--compile"] * args.compile + (["--model-config", args.model_config] if args.model_config else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"case {case} ({mode}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _mib(n: float) -> str:
    return f"{n / 2**20:8.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 interleaved run of 3 timed steps per case")
    parser.add_argument("--model", default="medclip-small")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="interleaved speed runs (fresh processes)")
    parser.add_argument("--mem-steps", type=int, default=2, help="steps of each case alone (memory pass)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per case (1: least noise on a busy machine)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--profile", action="store_true", help="profile even when both goals are met")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--profile-rows", type=int, default=18)
    parser.add_argument("--precision", default="fp32", help="fp32 | amp_bf16 | amp (both sides)")
    parser.add_argument("--attention", default="sdpa", help="medclip's attention kernel: sdpa | xformers | math")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--model-config", default=None, help="open_clip JSON config file to register (--model names it)")
    parser.add_argument("--synthetic", action="store_true", help="random batches: no data needed")
    # internal: one case in this (fresh) process
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--profile-case", dest="profile_case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--interleaved-case", dest="interleaved_case", choices=("all",), help=argparse.SUPPRESS)
    parser.add_argument("--batches", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.quick else 6)
    args.rounds = args.rounds or (1 if args.quick else 2)
    register_model_config(args.model_config)

    if args.interleaved_case:
        Path(args.out).write_text(json.dumps(run_interleaved(args)))
        return 0
    if args.case or args.profile_case:
        args.case = args.case or args.profile_case
        result = run_case(args) if args.profile_case is None else profile_case(args)
        Path(args.out).write_text(json.dumps(result))
        return 0

    if not SHARED.is_dir() and not args.synthetic:
        print(f"shared data missing: {SHARED}", file=sys.stderr)
        return 2
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        batches = work / "batches.pt"
        t = time.perf_counter()
        n_batches = min(args.warmup + args.steps + 1, 12)
        if args.synthetic:
            info = synthetic_batches(args.model, args.batch_size, n_batches, batches)
            print(f"data: {info['batches']} synthetic batches of {args.batch_size} (random pixels and token ids)")
        else:
            info = prepare_batches(args.model, args.batch_size, n_batches, batches, work)
            print(f"data: {info['batches']} pre-decoded batches of {args.batch_size} from {info['samples']} MedPix "
                  f"train samples (MeSH concept spans; median {info['concepts_per_batch']} valid concepts per batch, "
                  f"{info['captions_with_concepts']:.0%} of captions with concepts, up to "
                  f"{info['max_concepts_per_caption']} per caption), built in {time.perf_counter() - t:.0f}s")
        print(f"model: {args.model}  batch: {args.batch_size}  threads: {args.threads}  "
              f"(data loading EXCLUDED: every case trains on the same in-memory, pre-decoded batches)")
        print(f"speed: {args.rounds} fresh process(es), each alternating the three cases' steps "
              f"({args.warmup} warm-up + {args.steps} timed steps per case, order rotated every step)")
        steps: dict[str, list[float]] = {c: [] for c in CASES}
        for r in range(args.rounds):
            res = _child("all", args, batches, "interleaved-case")
            print(f"  round {r + 1}: " + "  ".join(
                f"{c} {statistics.median(res[c]):.3f}s" for c in CASES) + "  (median s/step)", flush=True)
            for c in CASES:
                steps[c] += res[c]
        print(f"memory: each case alone in a fresh process ({args.warmup} warm-up + {args.mem_steps} steps)")
        alone = {}
        for c in CASES:
            alone[c] = _child(c, args, batches, "case", steps=args.mem_steps)
            print(f"  {LABELS[c]:<30} alone: median step {alone[c]['median_step']:.3f}s", flush=True)

        med = {c: statistics.median(steps[c]) for c in CASES}
        device = alone[CASES[0]]["device"]
        print()
        mem_head = "peak CUDA MiB" if device == "cuda" else "peak RSS MiB  RSS growth MiB"
        print(f"{'case':<32} {'s/step':>8} {'samples/s':>10} {'alone s/step':>13}  {mem_head}")
        for c in CASES:
            if device == "cuda":
                mem = _mib(alone[c]["cuda_peak"])
            else:
                mem = f"{_mib(alone[c]['peak_rss'])}      {_mib(alone[c]['peak_rss'] - alone[c]['baseline_rss'])}"
            print(f"{LABELS[c]:<32} {med[c]:8.3f} {args.batch_size / med[c]:10.1f} {alone[c]['median_step']:13.3f}  {mem}")
        print(f"(s/step, samples/s: medians of {len(steps[CASES[0]])} interleaved steps per case; RSS growth = "
              f"peak RSS - RSS before the first step)")
        speed = med["open_clip_train"] / med["medclip_it"]
        pc_cost = med["medclip_itpc"] / med["medclip_it"]
        paired_speed = statistics.median(o / m for o, m in zip(steps["open_clip_train"], steps["medclip_it"]))
        paired_pc = statistics.median(p / m for p, m in zip(steps["medclip_itpc"], steps["medclip_it"]))
        print()
        print(f"medclip IT-only / open_clip_train speed: {speed:.3f}  (median of step-paired ratios {paired_speed:.3f}; "
              f"goal >= 1.0: {'met' if speed >= 1 else 'MISSED'})")
        print(f"IT+PC time per step / IT-only:          {pc_cost:.3f}  (median of step-paired ratios {paired_pc:.3f}; "
              f"goal <= 1.25: {'met' if pc_cost <= 1.25 else 'MISSED'})")

        if args.profile or speed < 1 or pc_cost > 1.25:
            print()
            print(f"profile ({args.profile_steps} steps after {args.warmup} warm-up, torch.profiler, CPU):")
            profiles = {c: _child(c, args, batches, "profile-case", steps=args.profile_steps) for c in CASES}
            names = ("forward", "loss", "backward", "optimizer")
            print(f"{'phase (median s)':<18}" + "".join(f"{LABELS[c][:22]:>24}" for c in CASES))
            for name in names:
                print(f"{name:<18}" + "".join(f"{profiles[c]['phases'].get(name, math.nan):24.4f}" for c in CASES))
            for c in CASES:
                print(f"\n--- {LABELS[c]}: top ops by self CPU time")
                print(profiles[c]["table"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
