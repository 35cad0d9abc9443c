"""The rehearsal's checklist: one function per item, each reading what the runs left on disk.

Runs: ``straight`` (uninterrupted), ``killed`` (SIGKILLed by fault injection while writing a
checkpoint) and ``resumed`` (``--resume latest`` in the killed run's output directory).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medclip.errors import MedclipError


@dataclass
class Check:
    title: str
    ok: bool
    lines: list[str] = field(default_factory=list)


@dataclass
class Runs:
    """What the checks read: the plan, the rehearsed recipes, launches and their directories."""

    plan: object  # RehearsalPlan
    work: Path
    recipe: object  # the rehearsed Recipe (straight run's)
    straight: Path
    resumed: Path
    launches: dict  # name -> launch.Launch
    kill_step: int
    resume_step: int
    after_kill: dict[str, str] = field(default_factory=dict)  # checkpoint folder right after the kill

    def fault(self) -> dict | None:
        path = self.work / "fault.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def keys(self, launch: str) -> list[dict[int, list[str]]]:
        """Per rank: step -> sample keys of that step (the last record of a step wins)."""
        out = []
        for rank in range(self.plan.nproc):
            path = self.work / "keys" / f"{launch}-rank{rank}.jsonl"
            steps: dict[int, list[str]] = {}
            if path.is_file():
                for line in path.read_text().splitlines():
                    if line.strip():
                        record = json.loads(line)
                        steps[int(record["step"])] = record["keys"]
            out.append(steps)
        return out

    def final_checkpoint(self, run_dir: Path) -> Path:
        return run_dir / "checkpoints" / f"step_{self.recipe.run.steps}.pt"


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    from medclip.training.monitor import read_log

    out = {}
    for record in read_log(run_dir / "log.jsonl"):
        if key in record:
            value = record[key]
            out[int(record["step"])] = float(value) if not isinstance(value, str) else float("nan")
    return out


# ----------------------------------------------------------------------------- the items

def runs_completed(runs: Runs) -> Check:
    lines, ok = [], True
    expected = {"straight": "finished", "killed": "killed", "resumed": "finished"}
    for name, launch in runs.launches.items():
        want_ok = expected[name] == "finished"
        good = launch.ok if want_ok else not launch.ok and runs.fault() is not None
        ok &= good
        state = "finished" if launch.ok else f"exit codes {launch.exit_codes}"
        lines.append(f"{name}: {state} in {launch.seconds:.0f} s" + ("" if good else f" -- {launch.error_line()}"))
    return Check("runs completed", ok, lines)


def manifests_found_and_counted(runs: Runs) -> Check:
    from medclip.data.manifest import check_manifest
    from medclip.training.rehearsal.data import run_manifests

    lines, ok = [], True
    try:
        manifests = run_manifests(runs.recipe, runs.straight)
    except MedclipError as exc:
        return Check("manifests found and counted", False, [str(exc)])
    kinds = {s.name: s for s in runs.plan.sources}
    for m in manifests:
        problems = check_manifest(m, verify_checksums=True)
        counted = _counted_samples(m)
        source = kinds.get(m.name)
        where = f"{source.kind}: {source.detail}" if source else "built by the run"
        lines.append(f"{m.name}: {len(m.urls)} shards, {counted} samples, weight {m.weight:g} ({where})")
        lines += [f"  problem: {p}" for p in problems]
        ok &= not problems
    skips = _final_skips(runs)
    shard_level = {k: v for k, v in skips.items() if k in ("truncated_tar", "unreadable_shard") and v}
    lines.append(f"skipped while training: {dict(skips) or 'nothing'}")
    ok &= not shard_level
    return Check("manifests found and counted", ok, lines)


def _counted_samples(manifest) -> int:
    from medclip.data.manifest import count_tar_samples
    from medclip.training.rehearsal.data import local_path

    total = 0
    for url in manifest.urls:
        path = local_path(url)
        if path is not None and path.is_file():
            total += count_tar_samples(path)
    return total


def _final_skips(runs: Runs) -> Counter:
    from medclip.training.checkpoint import read_checkpoint

    path = runs.final_checkpoint(runs.straight)
    skips: Counter = Counter()
    if path.is_file():
        for state in read_checkpoint(path).get("data") or []:
            skips.update({k: int(v) for k, v in (state.get("skips") or {}).items()})
    return skips


def intended_shares(manifests, epoch_samples: int | None) -> dict[str, float]:
    """Each source's intended share of the samples drawn, by the stream's own mixing plan."""
    from medclip.data.mixing import plan_mix

    shares = plan_mix(manifests, epoch_samples).shares()
    return {manifests[i].name: share for i, share in shares.items()}


def sources_mixed_as_weighted(runs: Runs) -> Check:
    from medclip.training.rehearsal.data import run_manifests, shard_keys

    manifests = run_manifests(runs.recipe, runs.straight)
    owner: dict[str, str] = {}
    for m in manifests:
        owner.update(shard_keys(m))
    drawn = [k for rank in runs.keys("straight") for step in sorted(rank) for k in rank[step]]
    counts = Counter(owner.get(k, "?") for k in drawn)
    n = max(len(drawn), 1)
    intended = intended_shares(manifests, runs.recipe.data.epoch_samples)
    expected = runs.recipe.run.steps * runs.plan.nproc * runs.recipe.data.batch_size
    lines, ok = [], len(drawn) == expected
    for name, share in intended.items():
        measured = counts.get(name, 0) / n
        # 3 binomial standard deviations of a share measured on n samples (and one point of slack).
        tolerance = 3 * math.sqrt(share * (1 - share) / n) + 0.01
        good = abs(measured - share) <= tolerance
        ok &= good
        lines.append(f"{name}: intended {100 * share:5.1f}%  measured {100 * measured:5.1f}%  "
                     f"(+-{100 * tolerance:.1f}){'' if good else '  <-- off'}")
    if counts.get("?"):
        ok = False
        lines.append(f"{counts['?']} sample keys belong to no source's shards")
    lines.append(f"{len(drawn)} of {expected} samples ({runs.recipe.run.steps} steps x {runs.plan.nproc} processes "
                 f"x {runs.recipe.data.batch_size}); intended = weight x samples / sum (medclip.data.mixing)")
    return Check("sources mixed as weighted", ok, lines)


def loss_terms(recipe) -> dict[str, int]:
    """Each loss term in log.jsonl -> the first step it trains. A staged objective (PC-Align from
    ``pc_start_step``) raises the total when a term joins, so each term is judged over its own steps."""
    terms = {"it": 1}
    if recipe.objective.pc_weight > 0:
        terms["pc"] = recipe.objective.pc_start_step + 1
    return terms


def loss_finite_and_falling(runs: Runs) -> Check:
    totals = _losses(runs.straight)
    if not totals:
        return Check("loss finite and falling", False, ["no loss in log.jsonl"])
    ok = all(math.isfinite(v) for v in totals.values()) and len(totals) == runs.recipe.run.steps
    lines = [f"{sum(math.isfinite(v) for v in totals.values())}/{len(totals)} logged losses finite"]
    for term, start in loss_terms(runs.recipe).items():
        by_step = _losses(runs.straight, term)
        values = [by_step[s] for s in sorted(by_step) if s >= start]
        k = max(1, len(values) // 4)
        first, last = sum(values[:k]) / k, sum(values[-k:]) / k
        ok = ok and len(values) > 1 and last < first
        lines.append(f"{term} (steps {start}-{runs.recipe.run.steps}): mean of the first {k} {first:.4f} -> "
                     f"last {k} {last:.4f}")
    return Check("loss finite and falling", ok, lines)


def inspect_checkpoints(folder: Path) -> dict[str, str]:
    """Every file in a checkpoint folder -> 'loads' or why not (run right after the kill)."""
    from medclip.training import checkpoint as ckpt

    found = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if not ckpt.CHECKPOINT_RE.match(path.name):
            found[path.name] = f"not a checkpoint name ({path.stat().st_size} bytes)"
            continue
        try:
            ckpt.read_checkpoint(path)
            found[path.name] = "loads"
        except (MedclipError, OSError) as exc:
            found[path.name] = f"does not load: {exc}"
    return found


def checkpoint_written_atomically(runs: Runs) -> Check:
    from medclip.training import checkpoint as ckpt

    fault = runs.fault()
    if fault is None:
        return Check("checkpoint written atomically", False, ["the fault was not injected (no kill recorded)"])
    lines = [f"SIGKILL {fault['when']} of step {fault['step']}"
             + (f" after {fault['bytes_written']} of {fault['bytes_total']} bytes" if "bytes_total" in fault else "")]
    lines += [f"after the kill: {name} {state}" for name, state in runs.after_kill.items()]
    named = [n for n in runs.after_kill if ckpt.CHECKPOINT_RE.match(n)]
    ok = bool(named) and all(runs.after_kill[n] == "loads" for n in named)
    killed_name = f"step_{fault['step']}.pt"
    if fault["when"] == "writing checkpoint" and killed_name in runs.after_kill:
        ok = False
        lines.append(f"{killed_name} exists although its write was killed")
    latest = max(named, key=lambda n: int(ckpt.CHECKPOINT_RE.match(n).group(1))) if named else "nothing"
    lines.append(f"--resume latest picks {latest}")
    return Check("checkpoint written atomically", ok, lines)


def resume_identical(runs: Runs) -> Check:
    import torch

    from medclip.training.checkpoint import read_checkpoint

    a_path, b_path = runs.final_checkpoint(runs.straight), runs.final_checkpoint(runs.resumed)
    if not (a_path.is_file() and b_path.is_file()):
        return Check("resume identical", False, [f"final checkpoint missing: {a_path if not a_path.is_file() else b_path}"])
    a, b = read_checkpoint(a_path), read_checkpoint(b_path)
    tensors = [(f"{part}.{k}", v, (b.get(part) or {}).get(k)) for part in ("model", "heads") for k, v in
               (a.get(part) or {}).items()]
    equal = sum(1 for _, x, y in tensors if y is not None and x.shape == y.shape and torch.equal(x, y))
    diff = max((float((x.float() - y.float()).abs().max()) for _, x, y in tensors
                if y is not None and x.shape == y.shape and x.numel()), default=0.0)
    lines = [f"final weights: {equal}/{len(tensors)} tensors bit-identical, max |difference| {diff:.3g}"]
    ok = equal == len(tensors) and len(tensors) > 0
    if "ema" in a:  # optim.ema_decay: the EMA is restored on resume, not started again from the weights
        ema = [(v, ((b.get("ema") or {}).get("weights") or {}).get(k)) for k, v in a["ema"]["weights"].items()]
        same = sum(1 for x, y in ema if y is not None and torch.equal(x, y))
        lines.append(f"EMA of the weights: {same}/{len(ema)} tensors bit-identical")
        ok &= same == len(ema) > 0
    straight = runs.keys("straight")
    killed, resumed = runs.keys("killed"), runs.keys("resumed")
    same_keys = 0
    total = 0
    for rank in range(runs.plan.nproc):
        joined = {s: k for s, k in killed[rank].items() if s <= runs.resume_step}
        joined.update(resumed[rank])
        total += len(straight[rank])
        same_keys += sum(1 for s, k in straight[rank].items() if joined.get(s) == k)
        if sorted(joined) != sorted(straight[rank]):
            ok = False
    first_bad = _first_difference(straight, killed, resumed, runs.resume_step)
    lines.append(f"sample keys: {same_keys}/{total} steps x processes identical"
                 + (f"; first difference at {first_bad}" if first_bad else ""))
    ok &= same_keys == total and total > 0
    la, lb = _losses(runs.straight), _losses(runs.resumed)
    same_loss = sum(1 for s, v in la.items() if lb.get(s) == v)
    lines.append(f"losses: {same_loss}/{len(la)} logged steps equal (resumed at step {runs.resume_step}; only the "
                 f"straight run evaluated)")
    ok &= same_loss == len(la)
    return Check("resume identical", ok, lines)


def _first_difference(straight, killed, resumed, resume_step: int) -> str | None:
    for rank in range(len(straight)):
        for step in sorted(straight[rank]):
            source = killed[rank] if step <= resume_step else resumed[rank]
            if source.get(step) != straight[rank][step]:
                return f"step {step}, rank {rank}"
    return None


PLAIN_OPEN_CLIP = r"""
import sys, json, torch, open_clip
from PIL import Image
export, image_path, texts, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
model.eval()
with torch.no_grad():
    image = model.encode_image(preprocess(Image.open(image_path).convert("RGB")).unsqueeze(0), normalize=True)
    text = model.encode_text(tokenizer(texts), normalize=True)
assert not any(name == "medclip" or name.startswith("medclip.") for name in sys.modules), "medclip was imported"
torch.save({"image": image, "text": text}, out)
"""


def export_loads_in_plain_open_clip(runs: Runs) -> Check:
    import torch

    import medclip

    export = runs.straight / "export"
    if not (export / "open_clip_config.json").is_file():
        return Check("export loads in plain open_clip", False, [f"no export in {export}"])
    from medclip.data.demo import demo_records

    pool_image = runs.work.resolve() / "export-check.png"
    next(demo_records(1, seed=1, image_size=96)).image.save(pool_image)
    texts = ["a chest X-ray showing a pleural effusion.", "an axial CT slice of the lung."]
    out = runs.work.resolve() / "export-check.pt"
    # From inside the export, as the README tells open_clip users: a text tower that is not a published
    # hub model is named "." (the export itself), which plain open_clip resolves against the working directory.
    proc = subprocess.run([sys.executable, "-c", PLAIN_OPEN_CLIP, ".", str(pool_image), json.dumps(texts),
                           str(out)], capture_output=True, text=True, timeout=600, cwd=export)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return Check("export loads in plain open_clip", False, [f"plain open_clip failed: {last}"])
    plain = torch.load(out, weights_only=True)
    encoder = medclip.load(export, device="cpu")
    ours_image = encoder.encode_image([str(pool_image)])
    ours_text = encoder.encode_text(texts)
    diff = max(float((ours_image.float() - plain["image"].float()).abs().max()),
               float((ours_text.float() - plain["text"].float()).abs().max()))
    ok = diff <= 1e-4
    return Check("export loads in plain open_clip", ok, [
        f"a fresh interpreter importing only open_clip, run inside {export}, loaded local-dir:.",
        f"image and text embeddings equal to medclip.load's: max |difference| {diff:.2g} (tolerance 1e-4)"])


def eval_ran(runs: Runs) -> Check:
    from medclip.evaluation.report import read_results
    from medclip.evaluation.suites import load_suite

    lines, ok = [], True
    steps = [runs.recipe.run.steps]
    if runs.recipe.eval.every_steps:
        steps = sorted({*range(runs.recipe.eval.every_steps, runs.recipe.run.steps, runs.recipe.eval.every_steps),
                        runs.recipe.run.steps})
    if not runs.recipe.eval.suites:
        return Check("eval ran", True, ["the recipe names no evaluation suite"])
    data = {s.name: s for s in runs.plan.suites}
    for step in steps:
        records = read_results(runs.straight / "eval" / f"step_{step}")
        got = {(r.get("suite"), r["dataset"]) for r in records}
        for name in runs.recipe.eval.suites:
            suite = load_suite(name)
            wanted = {(suite.name, d.name) for d in suite.datasets}
            missing = sorted(d for s, d in wanted - got)
            headlines = [r["headline"] for r in records if r.get("suite") == suite.name]
            finite = sum(1 for h in headlines if isinstance(h, (int, float)) and math.isfinite(h))
            info = data.get(suite.name)
            lines.append(f"step {step}: {suite.name} {len(wanted) - len(missing)}/{len(wanted)} datasets, "
                         f"{finite} finite headline metrics ({info.kind if info else '?'} data)"
                         + (f"; missing {', '.join(missing[:4])}" if missing else ""))
            ok &= not missing
    return Check("eval ran", ok, lines)


CHECKS = (runs_completed, manifests_found_and_counted, sources_mixed_as_weighted, loss_finite_and_falling,
          checkpoint_written_atomically, resume_identical, export_loads_in_plain_open_clip, eval_ran)


def run_checks(runs: Runs) -> list[Check]:
    out = []
    for check in CHECKS:
        try:
            out.append(check(runs))
        except Exception as exc:  # a check that cannot be computed is a failed item, not a crash
            out.append(Check(check.__name__.replace("_", " "), False, [f"{type(exc).__name__}: {exc}"]))
    return out
