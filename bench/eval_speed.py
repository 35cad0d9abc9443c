"""Zero-shot evaluation wall time: medclip vs CLIP_benchmark's own `evaluate`, same model and data, one run.

Data: MedPix dev (../shared/data/medpix/dev.jsonl), modality CT vs MRI with 4 prompts per class (the
shared_real suite's entry). Both sides get the same model object, the same image transform, the same
batch size and worker count, fp32 (CLIP_benchmark with --no_amp, so the numbers are comparable).

The headline is the same-pixels comparison: medclip with ``--no-draft`` (every image decoded at full
size, so every pixel the model sees is the plain transform's, as in CLIP_benchmark) against
CLIP_benchmark. medclip's default JPEG draft decoding (a reduced-scale decode when the JPEG is at least
twice the model input; other pixels, hence possibly other scores) is reported as an option beside it,
with its own ratio. The runs are interleaved in each repeat (order rotated) so a busy shared machine
slows all of them alike; each is timed end to end (text + images + metrics). Prints median (and min)
times over --repeats, the ratios medclip / CLIP_benchmark (goal <= 0.8 for the headline) and every run's
acc1.

    .venv/bin/python bench/eval_speed.py [--quick] [--model medclip-small] [--workers 2]
"""

from __future__ import annotations

import argparse
import builtins
import statistics
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
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of --repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.manual_seed(0)

    from clip_benchmark.metrics import zeroshot_classification as cb

    cb.float = _scalar_float
    suite = load_suite("shared_real")
    spec = suite.select(["medpix_modality"])[0]
    data = read_dataset(spec.source.reader, suite.root, **spec.source.args)
    encoder = medclip.load(args.model, device="cpu")
    targets = build_targets(data, spec.label, spec.classes)
    prompts = dict(zip(spec.classes.labels, spec.classes.class_prompts()))

    def run_medclip(draft: bool):
        # A fresh EvalModel each run: no image features memoized from the previous repeat.
        options = EmbedOptions(batch_size=args.batch_size, num_workers=args.workers, draft=draft)
        return zero_shot(EvalModel(encoder), data, spec.label, spec.classes, options=options).metrics

    def run_clip_benchmark():
        ds = _Labelled([data.images[i] for i in targets.indices], targets.target.tolist(), encoder.preprocess,
                       spec.classes.labels)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, num_workers=args.workers)
        return cb.evaluate(encoder.model, loader, encoder.tokenizer, spec.classes.labels, prompts, "cpu", amp=False)

    runs = {"medclip --no-draft": lambda: run_medclip(False), "CLIP_benchmark evaluate": run_clip_benchmark,
            "medclip (draft decoding)": lambda: run_medclip(True)}
    for fn in runs.values():
        fn()  # warm up all (page cache, lazy imports, worker start-up code paths) before timing
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict] = {}
    names = list(runs)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each repeat
            start = time.perf_counter()
            results[name] = runs[name]()
            times[name].append(time.perf_counter() - start)

    print(f"model {args.model}, {len(targets.indices)} images, {len(spec.classes.labels)} classes, "
          f"batch {args.batch_size}, workers {args.workers}, threads {torch.get_num_threads()}, "
          f"{repeats} interleaved repeats")
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in names:
        print(f"{name:24s} median {median[name]:6.3f} s  min {min(times[name]):6.3f} s  "
              f"acc1={results[name]['acc1']:.4f}")
    ref = median["CLIP_benchmark evaluate"]
    same = median["medclip --no-draft"] / ref
    print(f"ratio medclip / CLIP_benchmark, same pixels (--no-draft): {same:.3f} "
          f"(goal <= 0.8: {'met' if same <= 0.8 else 'NOT met'})")
    print(f"option: ratio medclip with draft JPEG decoding (other pixels) / CLIP_benchmark: "
          f"{median['medclip (draft decoding)'] / ref:.3f}")


if __name__ == "__main__":
    main()
