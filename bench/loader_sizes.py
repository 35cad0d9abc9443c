"""Loader CPU per sample at the image sizes the UniMed sources are released at, against the alternatives.

Sources: real COVID-CXR / MedPix images upscaled (bicubic) to a longer side of 256, 512, 1024 and 2048 px
and stored as JPEG q90 (8-bit gray or RGB) or PNG (8-bit gray, 16-bit gray, RGB). Every side runs the
recipes' train transform at 224 px (open_clip's ``image_transform_v2(PreprocessCfg(size=224),
is_train=True)``: RandomResizedCrop scale 0.9-1, bicubic) and hands over normalised float pixels:

- ``medclip``: the training loader (``build_train_stream``: tar shards, shuffle, decode, augment seeded per
  sample, tokenize, collate, ``--workers`` worker processes) with ``fast_decode`` on (the default), and
  ``medclip-full`` with it off (the loader before the reduced decode); the consumer normalises the uint8
  batches inside the timing, as the trainer does;
- ``open_clip``: open_clip_train's path, PIL full decode + ``convert("RGB")`` + the transform;
- ``decode_jpeg``: torchvision's libjpeg-turbo ``decode_jpeg`` (full size) + ``v2.RandomResizedCrop``
  (antialiased bicubic, same scale and ratio) + normalise, on tensors (JPEG only);
- ``pil-draft``: PIL with DCT scaling, ``draft("RGB", (224, 224))`` (largest 1/2^k keeping both sides
  >= 224) + the transform (JPEG only).

The alternatives run over the same image bytes in a pool of ``--workers`` forked processes
(single-threaded torch), each image visited ``--passes`` times per measurement on every side (the
loader: an epoch of ``passes x images`` samples); the methods alternate within each round and the
median of the rounds is printed: CPU ms per sample summed over all processes (``getrusage``; the
loader's includes its worker start-up each epoch, the pool's its start), samples/s per core, and the
cores a GPU needs at 400 samples/s (``unimed_vitb16``'s rate on one GPU). Then the goals' ratios,
from the same run. open_clip's path turns a 16-bit PNG white (``convert("RGB")`` clips at 255): its
cost is shown, its pixels are wrong.

    .venv/bin/python bench/loader_sizes.py            # JPEG gray + RGB, 4 sizes, 48 images x 10 passes, 2 rounds
    .venv/bin/python bench/loader_sizes.py --full     # + PNG 8 / 16-bit gray and RGB, 96 images, 3 rounds
    .venv/bin/python bench/loader_sizes.py --formats png-gray16 --sides 2048
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from loader_throughput import REPO, SHARED, TRANSFORM, cpu_seconds  # noqa: E402  (one transform, one CPU clock)

SIDES = (256, 512, 1024, 2048)
FORMATS = {"jpeg-gray": ("jpg", "L"), "jpeg-rgb": ("jpg", "RGB"), "png-gray8": ("png", "L"),
           "png-gray16": ("png", "I;16"), "png-rgb": ("png", "RGB")}
RATE_PER_GPU = 400  # samples/s of unimed_vitb16 on one GPU: issue 27's estimate, assumed here, not measured
MEAN = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
STD = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
_crop = TRANSFORM.transforms[0]
TENSOR_CROP = v2.RandomResizedCrop(224, scale=_crop.scale, ratio=_crop.ratio,
                                   interpolation=v2.InterpolationMode.BICUBIC, antialias=True)


def source_images(n: int) -> list[Image.Image]:
    """n real images: chest X-rays (gray) and CT/MRI, alternating."""
    tables = [SHARED / "covid-cxr" / "train.jsonl", SHARED / "medpix" / "train.jsonl"]
    rows = [[json.loads(line) for line in t.read_text().splitlines()] for t in tables]
    return [Image.open(tables[i % 2].parent / rows[i % 2][i // 2]["image"]) for i in range(n)]


def encode(image: Image.Image, side: int, fmt: str) -> bytes:
    ext, mode = FORMATS[fmt]
    scale = side / max(image.size)
    big = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)
    if mode == "L":
        big = big.convert("L")
    elif mode == "I;16":  # 8 bits spread over 16 (x 257), as a 16-bit export
        big = Image.fromarray(np.asarray(big.convert("L")).astype(np.uint16) * 257)
    buf = io.BytesIO()
    big.save(buf, format="JPEG" if ext == "jpg" else "PNG", **({"quality": 90} if ext == "jpg" else {}))
    return buf.getvalue()


def write_shard(path: Path, blobs: list[bytes], ext: str) -> None:
    with tarfile.open(path, "w") as tar:
        for i, data in enumerate(blobs):
            for name, payload in ((f"{i:06d}.{ext}", data),
                                  (f"{i:06d}.json", json.dumps({"captions": [f"image {i}"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _open_clip(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        return TRANSFORM(im.convert("RGB"))


def _pil_draft(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.draft("RGB", (224, 224))
        return TRANSFORM(im.convert("RGB"))


def _decode_jpeg(data: bytes) -> torch.Tensor:
    pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
    return (TENSOR_CROP(pixels).float().div_(255) - MEAN) / STD


ALTERNATIVES = {"open_clip": _open_clip, "decode_jpeg": _decode_jpeg, "pil-draft": _pil_draft}


def _pool_worker(job: tuple[str, list[bytes]]) -> int:
    torch.set_num_threads(1)
    method, blobs = job
    for data in blobs:
        ALTERNATIVES[method](data)
    return len(blobs)


def alternative_cpu_ms(method: str, blobs: list[bytes], processes: int) -> float:
    """CPU per sample of ``processes`` forked workers over ``blobs`` (their start counted, as the loader's)."""
    cpu = cpu_seconds()
    with mp.get_context("fork").Pool(processes) as pool:  # children are reaped on exit: their CPU is counted
        n = sum(pool.map(_pool_worker, [(method, blobs[i::processes]) for i in range(processes)]))
    return 1000 * (cpu_seconds() - cpu) / n


def loader_cpu_ms(stream) -> float:
    """One epoch of ``stream`` (every image once), normalised as the trainer does."""
    from medclip.data.images import normalize_images

    cpu = cpu_seconds()
    n = 0
    for batch in stream:
        normalize_images(batch["images"], stream.image_mean, stream.image_std)
        n += len(batch["keys"])
    return 1000 * (cpu_seconds() - cpu) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="all five formats, 96 images, 3 rounds")
    parser.add_argument("--images", type=int, help="images per size and format (default 48, --full 96)")
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 2, --full 3)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--passes", type=int, default=10, help="visits of every image per measurement (the loader's "
                        "worker start-up each epoch amortised as over a training epoch)")
    parser.add_argument("--sides", type=int, nargs="+", default=list(SIDES))
    parser.add_argument("--formats", nargs="+", choices=list(FORMATS))
    args = parser.parse_args(argv)
    formats = args.formats or (list(FORMATS) if args.full else ["jpeg-gray", "jpeg-rgb"])
    n_images = args.images or (96 if args.full else 48)
    rounds = args.rounds or (3 if args.full else 2)
    sys.path.insert(0, str(REPO))
    import medclip
    from medclip.data.manifest import Manifest
    from medclip.data.stream import build_train_stream

    if not SHARED.is_dir():
        print(f"shared data missing: {SHARED}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    tokenizer = medclip.load("medclip-tiny").tokenizer
    originals = source_images(n_images)
    table: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in formats:
            ext = FORMATS[fmt][0]
            for side in args.sides:
                blobs = [encode(im, side, fmt) for im in originals]
                shards = [Path(tmp) / f"{fmt}-{side}-{k}.tar" for k in range(args.workers)]
                for k, shard in enumerate(shards):
                    write_shard(shard, blobs[k::args.workers], ext)
                manifest = Manifest(f"{fmt}-{side}", [str(s) for s in shards], caption_fields=["captions"])
                streams = {name: build_train_stream([manifest], tokenizer, TRANSFORM, batch_size=16, seed=0,
                                                    num_workers=args.workers, shuffle_buffer=16, fast_decode=fast,
                                                    epoch_samples=args.passes * n_images)
                           for name, fast in (("medclip", True), ("medclip-full", False))}
                methods = [*streams, *(m for m in ALTERNATIVES if ext == "jpg" or m == "open_clip")]
                runs: dict[str, list[float]] = {m: [] for m in methods}
                for _ in range(rounds):
                    for m in methods:
                        runs[m].append(loader_cpu_ms(streams[m]) if m in streams
                                       else alternative_cpu_ms(m, blobs * args.passes, args.workers))
                table[fmt, side] = {m: statistics.median(v) for m, v in runs.items()}
                cells = "  ".join(f"{m} {v:6.2f}" for m, v in table[fmt, side].items())
                table[fmt, side]["kb"] = sum(map(len, blobs)) / len(blobs) / 1000  # on disk, per image
                print(f"{fmt:10s} {side:5d} px  {table[fmt, side]['kb']:7.1f} kB/image  cpu ms/sample: {cells}",
                      flush=True)
    print_table(table, n_images * args.passes, rounds, args.workers)
    return 0


def print_table(table: dict, n_images: int, rounds: int, workers: int) -> None:
    methods = ["medclip", "medclip-full", "open_clip", "decode_jpeg", "pil-draft"]
    print(f"\n{n_images} samples per measurement, {rounds} rounds (median), {workers} processes, 224 px train transform; "
          f"CPU ms per sample (all processes) / samples/s per core / cores per GPU at an assumed {RATE_PER_GPU} samples/s (not measured)")
    print(f"| source | side | kB/image | {' | '.join(methods)} | medclip / open_clip |")
    print("|---|---|---|" + "---|" * (len(methods) + 1))
    for (fmt, side), row in table.items():
        cells = [f"{row[m]:.2f} / {1000 / row[m]:.0f} / {RATE_PER_GPU * row[m] / 1000:.2f}" if m in row else "-"
                 for m in methods]
        print(f"| {fmt} | {side} | {row['kb']:.0f} | {' | '.join(cells)} | {row['medclip'] / row['open_clip']:.3f} |")
    goals = [("1024 px JPEG: medclip / open_clip", 1024, "open_clip", 0.35),
             ("2048 px JPEG: medclip / open_clip", 2048, "open_clip", 0.2),
             ("256 px JPEG: medclip / medclip-full (today's loader; no worse = within 5% noise)", 256, "medclip-full", 1.05)]
    for label, side, ref, goal in goals:
        for fmt in ("jpeg-gray", "jpeg-rgb"):
            if (fmt, side) in table:
                ratio = table[fmt, side]["medclip"] / table[fmt, side][ref]
                print(f"goal {label} ({fmt}): {ratio:.3f}  (goal <= {goal}: {'met' if ratio <= goal else 'NOT met'})")


if __name__ == "__main__":
    raise SystemExit(main())
