"""Zero-shot evaluation wall time: medclip vs CLIP_benchmark's own `evaluate`, same model and data, one run.

Data: MedPix dev (../shared/data/medpix/dev.jsonl), modality CT vs MRI with 4 prompts per class (the
shared_real suite's entry). Both sides get the same model object, the same image transform, the same
batch size and worker count, fp32 (CLIP_benchmark with --no_amp, so the numbers are comparable).
Prints both times (best of --repeats), the ratio medclip / CLIP_benchmark (goal <= 0.8) and both acc1.

    .venv/bin/python bench/eval_speed.py [--quick] [--model medclip-small] [--workers 2]
"""

from __future__ import annotations

import argparse
import builtins
import time
from pathlib import Path

import numpy as np
import torch

import medclip
from medclip.evaluation import EmbedOptions, EvalModel, load_suite, read_dataset, zero_shot
from medclip.evaluation.zeroshot import build_targets

REPO = Path(__file__).resolve().parent.parent


def _scalar_float(x):
    # CLIP_benchmark 1.6.2's accuracy calls float() on a 1-d array: a TypeError under numpy >= 2.4.
    return builtins.float(x.reshape(-1)[0]) if isinstance(x, np.ndarray) else builtins.float(x)


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, images, targets, preprocess, classes):
        self.images, self.targets, self.preprocess, self.classes = images, targets, preprocess, classes

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.preprocess(self.images[i]), self.targets[i]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="medclip-small")
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    torch.manual_seed(0)

    from clip_benchmark.metrics import zeroshot_classification as cb

    cb.float = _scalar_float
    suite = load_suite("shared_real")
    spec = suite.select(["medpix_modality"])[0]
    data = read_dataset(spec.source.reader, suite.root, **spec.source.args)
    encoder = medclip.load(args.model, device="cpu")
    targets = build_targets(data, spec.label, spec.classes)
    prompts = dict(zip(spec.classes.labels, spec.classes.class_prompts()))
    options = EmbedOptions(batch_size=args.batch_size, num_workers=args.workers)

    def run_medclip():
        # A fresh EvalModel each run: no image features memoized from the previous repeat.
        return zero_shot(EvalModel(encoder), data, spec.label, spec.classes, options=options).metrics

    def run_clip_benchmark():
        ds = _Labelled([data.images[i] for i in targets.indices], targets.target.tolist(), encoder.preprocess,
                       spec.classes.labels)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
        return cb.evaluate(encoder.model, loader, encoder.tokenizer, spec.classes.labels, prompts, "cpu", amp=False)

    def best_time(fn):
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return min(times), result

    run_medclip()  # warm up both (page cache, lazy imports) before timing
    t_ours, ours = best_time(run_medclip)
    t_ref, ref = best_time(run_clip_benchmark)
    print(f"model {args.model}, {len(targets.indices)} images, {len(spec.classes.labels)} classes, "
          f"batch {args.batch_size}, workers {args.workers}, threads {torch.get_num_threads()}, best of {repeats}")
    print(f"medclip zero-shot:       {t_ours:.3f} s  acc1={ours['acc1']:.4f}")
    print(f"CLIP_benchmark evaluate: {t_ref:.3f} s  acc1={ref['acc1']:.4f}")
    print(f"ratio medclip / CLIP_benchmark: {t_ours / t_ref:.3f} (goal <= 0.8)")


if __name__ == "__main__":
    main()
