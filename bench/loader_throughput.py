"""Loader throughput vs the raw decode+transform limit, on shards built from ../shared/data.

Both sides use the same number of processes and open_clip's 224 px training transform
(``image_transform_v2(PreprocessCfg(size=224), is_train=True)``). The raw limit decodes and
transforms the same JPEG bytes (already in memory) in a plain loop per process, the transform
including its ToTensor + Normalize. The loader reads the tar shards, shuffles, decodes, augments
(seeded per sample), tokenizes with span mapping and collates batches in its worker processes;
its workers ship uint8 pixels, and the consuming process normalizes them to float with
``normalize_images`` inside the timed loop, as the trainer does. Raw and loader rounds alternate
(the machine is shared) and the medians are compared. Each loader round is the next epoch of one
stream, as in training (round 0 is the first epoch: e.g. the tokenizer's word cache starts empty).

The loader's gray shortcut (``StreamConfig.gray_shortcut``: images with R = G = B, most of this
medical data, are augmented on one band, bit-identical pixels) does work the raw loop does not
skip, so each round also times the loader without it and both ratios are printed.

    .venv/bin/python bench/loader_throughput.py [--quick] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from open_clip.transform import PreprocessCfg, image_transform_v2
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"
TRANSFORM = image_transform_v2(PreprocessCfg(size=224), is_train=True)


def _raw_worker(blobs: list[bytes]) -> int:
    torch.set_num_threads(1)
    n = 0
    for data in blobs:
        with Image.open(io.BytesIO(data)) as im:
            TRANSFORM(im.convert("RGB"))
        n += 1
    return n


def cpu_seconds() -> float:
    """CPU time of this process and of its reaped children (pool and DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def raw_limit(blobs: list[bytes], processes: int) -> tuple[float, float]:
    """(samples/s, CPU ms per sample over all processes)."""
    chunks = [blobs[i::processes] for i in range(processes)]
    cpu = cpu_seconds()
    with mp.get_context("fork").Pool(processes) as pool:
        pool.map(_raw_worker, [c[:2] for c in chunks])  # warm-up outside the timing
        start = time.perf_counter()
        n = sum(pool.map(_raw_worker, chunks))
        rate = n / (time.perf_counter() - start)
    return rate, 1000 * (cpu_seconds() - cpu) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="alternating raw/loader measurements")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import medclip
    from medclip.data.builder import BuildConfig, build_shards, read_table
    from medclip.data.images import normalize_images
    from medclip.data.manifest import Manifest
    from medclip.data.stream import build_train_stream

    if not SHARED.is_dir():
        print(f"shared data missing: {SHARED}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        t = time.perf_counter()
        n_rows = 0
        for name, jsonl in (("medpix", "medpix/train.jsonl"), ("cxr", "covid-cxr/train.jsonl")):
            rep = build_shards(read_table(SHARED / jsonl), BuildConfig(out, prefix=name, max_samples=200,
                                                                      processes=args.workers))
            n_rows += rep.samples
        print(f"built {n_rows} samples into {len(list(out.glob('*.tar')))} shards in {time.perf_counter() - t:.1f}s")
        shards, blobs = [], []
        for s in sorted(str(p) for p in out.glob("*.tar")):  # --quick: whole shards up to 600 images
            if args.quick and len(blobs) >= 600:
                break
            shards.append(s)
            with tarfile.open(s) as tar:
                blobs += [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
        enc = medclip.load("medclip-tiny")
        manifest = Manifest("bench", shards, caption_fields=["captions"])

        # One stream per variant, one epoch per round: the loader as the trainer uses it (epoch after epoch).
        streams = {shortcut: build_train_stream([manifest], enc.tokenizer, TRANSFORM, batch_size=args.batch_size,
                                                seed=0, num_workers=args.workers, shuffle_buffer=500,
                                                gray_shortcut=shortcut)  # an epoch: every image of the shards once
                   for shortcut in (True, False)}

        def loader_rate(gray_shortcut: bool = True) -> tuple[float, float, float, torch.dtype, dict]:
            stream = streams[gray_shortcut]
            cpu = cpu_seconds()
            start = time.perf_counter()
            n = 0
            first = None
            dtype = None
            for batch in stream:
                images = batch["images"]
                if images.dtype == torch.uint8:  # the consumer's share of the work, as in the trainer
                    images = normalize_images(images, stream.image_mean, stream.image_std)
                dtype = images.dtype
                if first is None:  # worker start-up is excluded, as the raw pool is created before timing
                    first = time.perf_counter()
                    start_n = len(batch["keys"])
                n += len(batch["keys"])
            rate = (n - start_n) / (time.perf_counter() - first)
            return rate, 1000 * (cpu_seconds() - cpu) / n, first - start, dtype, stream.skip_counts()

        raws, loaders, rgb_loaders, startups = [], [], [], []
        cpu_raw, cpu_loader, cpu_rgb = [], [], []
        for r in range(args.rounds):
            rate, cpu = raw_limit(blobs, args.workers)
            raws.append(rate)
            cpu_raw.append(cpu)
            rate, cpu, startup, dtype, skips = loader_rate()
            loaders.append(rate)
            cpu_loader.append(cpu)
            startups.append(startup)
            rgb, cpu, *_ = loader_rate(gray_shortcut=False)
            rgb_loaders.append(rgb)
            cpu_rgb.append(cpu)
            print(f"round {r}: raw {raws[-1]:7.1f}  loader {rate:7.1f} samples/s  ratio {rate / raws[-1]:.3f}  "
                  f"(no gray shortcut: {rgb:7.1f}, {rgb / raws[-1]:.3f})  "
                  f"cpu ms/sample: raw {cpu_raw[-1]:.2f} loader {cpu_loader[-1]:.2f} no-shortcut {cpu:.2f}  skips {skips}")
        raw, loader, rgb = statistics.median(raws), statistics.median(loaders), statistics.median(rgb_loaders)
        c_raw, c_loader, c_rgb = (statistics.median(c) for c in (cpu_raw, cpu_loader, cpu_rgb))
        print(f"images: {len(blobs)}  processes: {args.workers}  transform: 224 px train  rounds: {args.rounds}")
        print(f"raw decode+transform+normalize limit (median): {raw:8.1f} samples/s")
        print(f"medclip loader incl. normalize (median):        {loader:8.1f} samples/s  "
              f"(startup {statistics.median(startups):.2f}s excluded; batches arrive as {dtype})")
        print(f"  same without the gray shortcut (median):      {rgb:8.1f} samples/s  (ratio {rgb / raw:.3f})")
        # On a busy machine the loader's 3 processes (2 workers + consumer) get a larger CPU share than the
        # raw pool's 2, which flatters the rate ratio; CPU time per sample does not depend on that share
        # (the loader's includes its worker start-up and shuffle-buffer fill, which its rate excludes).
        print(f"cpu per sample, all processes (median): raw {c_raw:.2f} ms, loader {c_loader:.2f} ms "
              f"(ratio {c_raw / c_loader:.3f}), no gray shortcut {c_rgb:.2f} ms (ratio {c_raw / c_rgb:.3f})")
        print(f"ratio loader/raw: {loader / raw:.3f}  (goal >= 0.90)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
