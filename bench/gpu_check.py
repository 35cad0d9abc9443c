"""Ready for the first GPU: run this as it is on a CUDA machine before a long pretraining run.

    python bench/gpu_check.py                      # everything below; a few minutes on one node
    python bench/gpu_check.py --skip-rehearsal     # only the timed step

1. The rehearsal (``medclip pretrain --config R --rehearse``) of each shipped recipe on 1 GPU, then on
   all visible GPUs (NCCL, one process per GPU, started by torchrun): debug model of the recipe's
   family, stand-in data where the shards are not on this machine, a SIGKILL and an exact resume,
   export and eval, with its checklist.
2. A timed training step of the UniMed-CLIP shape (``medclip-vit-b16-biomedbert``: ViT-B/16 at 224 px
   + a BERT-base text tower with BiomedBERT's dimensions, 256 tokens; random weights, built offline
   from a BertConfig) in bf16 autocast with fused AdamW, for each attention kernel (SDPA; xformers
   when installed) without and with ``torch.compile`` -- beside open_clip_train's own step
   (``train_one_epoch``) on the same model and batch, interleaved step by step by
   ``bench/train_throughput.py``. Printed: samples/s, peak memory, achieved TFLOP/s and MFU against
   the device's bf16 peak (``medclip.training.flops``).
3. JPEG decode on the GPU: batches of 1024 / 2048 px JPEGs through torchvision's nvJPEG
   (``decode_jpeg(device="cuda")``) and the 224 px random crop on the device: images/s and the host
   CPU left per image, beside the loader's CPU figures (bench/loader_sizes.py). Then the training
   loader with ``data.gpu_decode`` (workers draw the crops, ``normalize_batch`` decodes on the GPU)
   against its CPU path, same shards, interleaved: samples/s, host CPU ms per sample (all processes)
   and the pixel difference between the two (levels of 255).

Without CUDA it runs a reduced form on CPU, so it cannot rot (tests/test_rehearsal_gpu_check.py runs
it): the rehearsal of ``--recipes`` (default: demo) in 1 process through torchrun (gloo), and the timed
step on the debug model of the UniMed recipe (the rehearsal's, same family) at a small batch; it says
what it skipped and why (NCCL, all-GPU rehearsal, torch.compile unless --compile-on-cpu, xformers when
absent, MFU without a known peak, the GPU JPEG decode). Exit code 0 when every rehearsal passed and every step ran.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import train_throughput as tt  # noqa: E402  (the step driver and open_clip_train's side: one implementation)

FULL_MODEL = "medclip-vit-b16-biomedbert"
UNIMED_RECIPE = REPO / "pretrain" / "unimed_vitb16.yaml"


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def skip(self, what: str, why: str) -> None:
        self.skipped.append(f"{what}: {why}")
        self.say(f"SKIPPED {what}: {why}")


# ----------------------------------------------------------------------------- 1. rehearsals

def rehearsals(args, report: Report, gpus: int) -> None:
    from medclip.training.rehearsal import rehearse

    device = "cuda" if gpus else "cpu"
    counts = [1] + ([gpus] if gpus > 1 else [])
    if not gpus:
        report.skip("rehearsal on all visible GPUs with NCCL", "no CUDA device; ran 1 process with gloo instead")
    elif gpus == 1:
        report.skip("rehearsal on all visible GPUs", "only one GPU is visible")
    for recipe in args.recipes:
        config = recipe if recipe.endswith(".yaml") else str(REPO / "pretrain" / f"{recipe}.yaml")
        for nproc in counts:
            work = Path(args.work) / f"rehearsal-{Path(config).stem}-{nproc}{device}"
            started = time.monotonic()
            result = rehearse(config, work_dir=work, nproc=nproc, device=device, launcher="torchrun")
            report.say(result.text().rstrip())
            status = "passed" if result.ok else "FAILED"
            report.say(f"== rehearsal {Path(config).stem} on {nproc} {device} process(es) via torchrun: {status} "
                       f"in {time.monotonic() - started:.0f} s")
            if not result.ok:
                report.failed.append(f"rehearsal {Path(config).stem} x{nproc}")


# ----------------------------------------------------------------------------- 2. the timed step

def biomedbert_shaped(directory: Path) -> Path:
    """A BERT-base tower with BiomedBERT's dimensions (vocabulary 30522), random weights, offline.

    The tokenizer files are medclip's offline tiny vocabulary: the step's inputs are token ids.
    """
    import shutil

    from transformers import BertConfig

    from medclip.models.registry import ASSETS_DIR

    directory.mkdir(parents=True, exist_ok=True)
    BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
               intermediate_size=3072, max_position_embeddings=512).save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(ASSETS_DIR / "tiny-bert" / name, directory / name)
    return directory


def step_model(work: Path, reduced: bool) -> tuple[str, Path, dict]:
    """(name, config file, config) of the timed model: UniMed's shape, or its debug model on CPU."""
    from medclip.models.loading import resolve_config, with_text_dir
    from medclip.training.rehearsal.model import derive_debug_model

    full = resolve_config(FULL_MODEL)
    if reduced:
        cfg, name = derive_debug_model(full).config, "gpucheck-reduced-unimed-debug"
    else:
        cfg, name = with_text_dir(full, biomedbert_shaped(work / "biomedbert-shaped")), "gpucheck-vit-b16-biomedbert"
    path = work / "configs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(cfg, indent=2))
    return name, path, cfg


def flops_per_sample(model: str, batches: Path, batch_size: int, device: str, precision: str) -> dict[str, float]:
    """Training FLOPs per sample of medclip's IT-only and IT+PC steps, counted on copies (no side effects)."""
    import torch

    from medclip.training.flops import train_flops_per_sample

    batch = torch.load(batches, weights_only=True)[0]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, pc in (("medclip_it", 0.0), ("medclip_itpc", tt.PC_WEIGHT)):
            ns = argparse.Namespace(model=model, batch_size=batch_size, warmup=0, steps=1, device=device,
                                    precision=precision, attention="sdpa", compile=False)
            trainer = tt._build_medclip(ns, pc, f"{tmp}/{case}")
            module = copy.deepcopy(trainer.module)
            on_device = {k: v.to(trainer.device) for k, v in batch.items()}
            with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
                def forward(module=module, on_device=on_device, trainer=trainer):
                    with trainer._autocast():
                        return module.losses(module(on_device, 0), 0)

                out[case] = train_flops_per_sample(forward, batch_size)
    out["open_clip_train"] = out["medclip_it"]  # the same model and contrastive loss
    return out


def timed_steps(args, report: Report, gpus: int) -> None:
    import torch

    from medclip.training.attention import xformers_available
    from medclip.training.flops import device_peak_tflops

    reduced = gpus == 0
    device = "cuda" if gpus else "cpu"
    work = Path(args.work)
    name, config_file, cfg = step_model(work, reduced)
    tt.register_model_config(str(config_file))
    batch_size = args.batch_size or (4 if reduced else 128)
    precision = "amp_bf16"
    batches = work / "batches.pt"
    tt.synthetic_batches(name, batch_size, 3, batches)
    peak = device_peak_tflops(torch.device(device)) if gpus else None
    if reduced:
        report.skip("ViT-B/16 + BiomedBERT shape", "no CUDA device; timed the UniMed recipe's debug model instead "
                    f"({cfg['vision_cfg'].get('layers')} ViT layers, tiny BERT), batch {batch_size}")
    if peak is None:
        report.skip("MFU", f"no bf16 peak known for {'CPU' if not gpus else torch.cuda.get_device_name()} "
                    "(medclip.training.flops.PEAK_TFLOPS)")
    flops = flops_per_sample(name, batches, batch_size, device, precision)
    kernels = ["sdpa"] + (["xformers"] if xformers_available() else [])
    if "xformers" not in kernels:
        report.skip("xformers attention", "xformers is not installed")
    compiles = [False, True] if (gpus or args.compile_on_cpu) else [False]
    if len(compiles) == 1:
        report.skip("torch.compile", "CPU reduced form (minutes of compilation per variant); --compile-on-cpu runs it")
    report.say(f"\ntimed step: {name}, batch {batch_size} per device, {precision}, fused AdamW (medclip), "
               f"{args.warmup} warm-up + {args.steps} timed steps, interleaved with open_clip_train's train_one_epoch")
    header = f"{'variant':<26} {'case':<30} {'samples/s':>10} {'peak MiB':>9} {'TFLOP/s':>8} {'MFU':>7}"
    report.say(header)
    for kernel in kernels:
        for compiled in compiles:
            variant = f"{kernel}{' + compile' if compiled else ''}"
            ns = argparse.Namespace(model=name, batch_size=batch_size, warmup=args.warmup, steps=args.steps,
                                    threads=args.threads, device=device, profile_rows=1, precision=precision,
                                    attention=kernel, compile=compiled, model_config=str(config_file))
            try:
                speed = tt._child("all", ns, batches, "interleaved-case")
                alone = {c: tt._child(c, ns, batches, "case", steps=1) for c in tt.CASES}
            except SystemExit as exc:  # train_throughput reports a failed case this way
                report.failed.append(f"timed step {variant}")
                report.say(f"{variant:<26} FAILED: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
                continue
            for case in tt.CASES:
                step = statistics.median(speed[case])
                mem = alone[case].get("cuda_peak", alone[case]["peak_rss"]) / 2**20
                tflops = flops[case] * batch_size / step / 1e12
                mfu = f"{100 * tflops / peak:6.1f}%" if peak else "    n/a"
                report.say(f"{variant:<26} {tt.LABELS[case]:<30} {batch_size / step:10.1f} {mem:9.0f} "
                           f"{tflops:8.3f} {mfu}")
    report.say("(samples/s: median over interleaved steps; peak MiB: CUDA max allocated, on CPU peak RSS of the "
               "case alone; TFLOP/s from FLOPs per sample counted with torch's FlopCounterMode)")


# ----------------------------------------------------------------------------- 3. JPEG decode on the GPU

def gpu_jpeg_decode(args, report: Report, gpus: int) -> None:
    """Batches of 1024 / 2048 px JPEGs through nvJPEG (``decode_jpeg(device="cuda")``) + the 224 px random
    crop on the GPU, against the loader's CPU path (bench/loader_sizes.py) on the same bytes."""
    if not gpus:
        report.skip("GPU JPEG decode (nvJPEG)", "no CUDA device; the loader decodes on CPU (bench/loader_sizes.py "
                    "measures that path)")
        return
    import torch
    from loader_sizes import TENSOR_CROP, encode, source_images
    from torchvision.io import ImageReadMode, decode_jpeg

    originals = source_images(64)
    report.say(f"\nGPU JPEG decode: {len(originals)} images per batch, nvJPEG + random crop to 224 px on the GPU")
    for side in (1024, 2048):
        data = [torch.frombuffer(encode(im, side, "jpeg-rgb"), dtype=torch.uint8) for im in originals]
        decode_jpeg(data[:2], mode=ImageReadMode.RGB, device="cuda")  # warm-up: nvJPEG handle
        torch.cuda.synchronize()
        cpu, start = time.process_time(), time.perf_counter()
        for _ in range(args.steps):
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
            torch.stack([TENSOR_CROP(im) for im in images])
        torch.cuda.synchronize()
        n = args.steps * len(data)
        report.say(f"  {side} px: {n / (time.perf_counter() - start):8.1f} images/s, "
                   f"host CPU {1000 * (time.process_time() - cpu) / n:.2f} ms per image")
    loader_gpu_decode(args, report, originals)


def loader_gpu_decode(args, report: Report, originals) -> None:
    """The training loader with device decode (``data.gpu_decode``) against its CPU path, on CUDA."""
    import torch
    from loader_sizes import TRANSFORM, cpu_seconds, encode, write_shard

    import medclip
    from medclip.data.images import normalize_batch
    from medclip.data.manifest import Manifest
    from medclip.data.stream import build_train_stream

    tokenizer = medclip.load("medclip-tiny").tokenizer
    report.say(f"\nLoader with data.gpu_decode vs its CPU path (fast_decode on): 2 workers, batch 32, "
               f"{len(originals)} JPEGs x 4 passes, median of 3 interleaved rounds")
    for side in (1024, 2048):
        shard = Path(args.work) / f"gpu-decode-{side}.tar"
        write_shard(shard, [encode(im, side, "jpeg-rgb") for im in originals], "jpg")
        manifest = Manifest(f"jpeg-{side}", [str(shard)], caption_fields=["captions"])
        streams = {name: build_train_stream([manifest], tokenizer, TRANSFORM, batch_size=32, num_workers=2,
                                            shuffle_buffer=16, device_decode=on, epoch_samples=4 * len(originals))
                   for name, on in (("gpu_decode", True), ("cpu path", False))}
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in streams}
        images: dict[str, dict[str, torch.Tensor]] = {name: {} for name in streams}
        for _ in range(3):
            for name, stream in streams.items():
                cpu, start, n = cpu_seconds(), time.perf_counter(), 0
                for batch in stream:
                    batch = {k: v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                    out = normalize_batch(batch, stream)["images"]
                    n += len(batch["keys"])
                    images[name].update(zip(batch["keys"], out.cpu()))
                torch.cuda.synchronize()
                figures[name].append((n / (time.perf_counter() - start), 1000 * (cpu_seconds() - cpu) / n))
        std = torch.tensor(TRANSFORM.transforms[-1].std).view(3, 1, 1)
        # the last round's pixels of each key (the same crops: same seed, epoch, position)
        diffs = torch.stack([((images["gpu_decode"][k] - images["cpu path"][k]) * std * 255).abs()
                             for k in images["gpu_decode"] if k in images["cpu path"]])
        for name, runs in figures.items():
            rate, ms = statistics.median(r for r, _ in runs), statistics.median(m for _, m in runs)
            report.say(f"  {side} px {name:<10}: {rate:8.1f} samples/s, host CPU {ms:.2f} ms per sample")
        report.say(f"  {side} px pixels, gpu_decode vs CPU path (fast decode): mean |diff| {diffs.mean():.3f} levels, "
                   f"max {diffs.max():.1f}")


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=None,
                        help="recipes to rehearse (default: every shipped recipe on CUDA, demo on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="timed step's batch per device")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 10 on CUDA, 2 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per timed case")
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--skip-rehearsal", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--compile-on-cpu", action="store_true", help="also time torch.compile on CPU")
    args = parser.parse_args(argv)
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    args.recipes = args.recipes or (sorted(p.stem for p in (REPO / "pretrain").glob("*.yaml")) if gpus else ["demo"])
    args.steps = args.steps or (10 if gpus else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpus else 1)
    report = Report()
    report.say(f"gpu_check: {gpus} CUDA device(s)" + (f" ({torch.cuda.get_device_name(0)})" if gpus else
                                                       " -- reduced form on CPU"))
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.work or tmp
        if args.skip_rehearsal:
            report.skip("rehearsals", "--skip-rehearsal")
        else:
            rehearsals(args, report, gpus)
        if args.skip_step:
            report.skip("timed step", "--skip-step")
        else:
            timed_steps(args, report, gpus)
        gpu_jpeg_decode(args, report, gpus)
    report.say(f"\ngpu_check: {'FAILED: ' + '; '.join(report.failed) if report.failed else 'all ran'}"
               + (f"; skipped {len(report.skipped)}: " + "; ".join(report.skipped) if report.skipped else ""))
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
