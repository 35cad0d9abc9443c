"""`medclip pretrain --config RECIPE --rehearse`: the whole recipe at debug scale, before booking GPUs.

The rehearsal derives the rehearsed recipe (plan: debug model of the same family,
stand-in data in the manifests' formats when the real shards are not on disk, a 20-step
schedule), then runs it three times in N processes (launch):

1. ``straight``: uninterrupted, with the recipe's evaluations;
2. ``killed``: the same recipe without evaluation in a second directory; rank 0 is SIGKILLed
   half-way through writing the checkpoint of step 14 (the other ranks are ended, as torchrun's
   agent does);
3. ``resumed``: ``--resume latest`` in that directory, to the end.

and prints a checklist (checks): manifests found and counted, sources mixed as
weighted, loss finite and falling, checkpoint written atomically, resume identical to the
straight run (final weights bit for bit, sample keys, losses), export loads in plain open_clip
with the same embeddings, eval ran. Everything lands in the work directory (default: the
recipe's output_dir + ``-rehearsal``): the rehearsed recipe, logs of every process, the runs.

This module is imported by the CLI's argument parser: it imports nothing heavy at module level.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medclip import jsonio
from medclip.errors import MedclipError

MARKER = ".medclip-rehearsal"


def add_arguments(parser) -> None:
    """The rehearsal's options of `medclip pretrain`."""
    group = parser.add_argument_group("rehearsal (run the recipe at debug scale first)")
    group.add_argument("--rehearse", action="store_true",
                       help="rehearse the recipe: debug model, stand-in data where shards are missing, 20 steps in "
                            "2 processes, a SIGKILL and resume, export and eval; prints a checklist")
    group.add_argument("--rehearse-dir", default=None, help="work directory (default: OUTPUT_DIR-rehearsal)")
    group.add_argument("--rehearse-procs", type=int, default=2, help="processes (default 2)")
    group.add_argument("--rehearse-device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu (gloo) or cuda (nccl, one process per GPU)")
    group.add_argument("--rehearse-launcher", choices=("fork", "torchrun"), default=None,
                       help="how processes start (default: fork on cpu, torchrun on cuda)")


def run_from_args(args) -> int:
    overrides = args.set + (["data.allow_pipe=true"] if getattr(args, "allow_pipe", False) else [])
    report = rehearse(args.config, overrides, work_dir=args.rehearse_dir, nproc=args.rehearse_procs,
                      device=args.rehearse_device, launcher=args.rehearse_launcher)
    print(report.text(), end="")
    return 0 if report.ok else 1


@dataclass
class RehearsalReport:
    config: str
    work_dir: Path
    plan: object
    checks: list = field(default_factory=list)
    seconds: float = 0.0
    launcher: str = "fork"
    timings: dict = field(default_factory=dict)  # phase -> seconds

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def text(self) -> str:
        p = self.plan
        out = [f"medclip rehearsal of {self.config}: {p.nproc} processes ({self.launcher}, "
               f"{'nccl' if p.device == 'cuda' else 'gloo'}, {p.device}), {p.values['run']['steps']} steps; "
               f"work dir {self.work_dir}", "kept:"]
        out += [f"  - {line}" for line in p.kept()]
        out += ["swapped:"] + [f"  - model: {line}" for line in p.model_notes]
        out += [f"  - {s.line()}" for s in p.swaps if s.key != "model.name"]
        out += ["data:"] + [f"  - {s.name} ({s.kind}): {s.detail}" for s in p.sources]
        out += [f"  - eval suite {s.name} ({s.kind}): {s.detail}" for s in p.suites]
        out.append("checklist:")
        for check in self.checks:
            out.append(f"  [{'PASS' if check.ok else 'FAIL'}] {check.title}")
            out += [f"         {line}" for line in check.lines]
        passed = sum(c.ok for c in self.checks)
        verdict = "ready for GPUs" if self.ok else "NOT ready: fix the FAIL items (logs in " \
                                                   f"{self.work_dir / 'logs'})"
        phases = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
        out.append(f"rehearsal: {passed}/{len(self.checks)} items passed in {self.seconds:.0f} s ({phases}); {verdict}")
        return "\n".join(out) + "\n"

    def to_dict(self) -> dict:
        return {"config": self.config, "ok": self.ok, "seconds": round(self.seconds, 1),
                "timings": {k: round(v, 1) for k, v in self.timings.items()},
                "checks": [{"title": c.title, "ok": c.ok, "lines": c.lines} for c in self.checks],
                "swaps": [s.line() for s in self.plan.swaps], "model": self.plan.model_notes}


def _prepare_work_dir(work: Path) -> Path:
    if work.exists() and any(work.iterdir()):
        if not (work / MARKER).is_file():
            raise MedclipError(f"rehearsal work directory {work} exists and is not a rehearsal's; "
                               f"give another --rehearse-dir")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / MARKER).write_text("written by medclip pretrain --rehearse; removed and rewritten by the next one\n")
    return work


def rehearse(config: str, overrides: list[str] | None = None, work_dir: str | Path | None = None, nproc: int = 2,
             device: str = "cpu", launcher: str | None = None) -> RehearsalReport:
    """Rehearse the recipe ``config`` (with ``--set`` overrides); see the module doc."""
    from medclip.training.config import load_recipe
    from medclip.training.rehearsal.checks import Runs, inspect_checkpoints, run_checks
    from medclip.training.rehearsal.launch import launch
    from medclip.training.rehearsal.plan import CHECKPOINT_EVERY, KILL_AT_CHECKPOINT, make_plan

    started = time.monotonic()
    if nproc < 1:
        raise MedclipError(f"--rehearse-procs must be >= 1, got {nproc}")
    launcher = launcher or ("torchrun" if device == "cuda" else "fork")
    if device == "cuda":
        import torch

        if launcher == "fork":
            raise MedclipError("--rehearse-launcher fork cannot start CUDA processes; use torchrun")
        if nproc > torch.cuda.device_count():
            raise MedclipError(f"--rehearse-procs {nproc} on cuda: only {torch.cuda.device_count()} GPU(s) visible")
    recipe = load_recipe(config, overrides or [])
    # Absolute: the checks run helper interpreters in other directories (plain open_clip in the work dir).
    work = _prepare_work_dir(Path(work_dir or recipe.run.output_dir + "-rehearsal").absolute())
    plan = make_plan(recipe, str(config), work, nproc=nproc, device=device)
    timings = {"plan and stand-ins": time.monotonic() - started}
    straight_yaml = plan.write_recipe(work / "recipe-straight.yaml", work / "runs" / "straight")
    resumed_yaml = plan.write_recipe(work / "recipe-resumed.yaml", work / "runs" / "resumed", evaluate=False)
    rehearsed = load_recipe(straight_yaml)

    def command(path: Path) -> list[str]:
        return ["pretrain", "--config", str(path), "--resume", "latest"]  # as pretrain/slurm.sbatch runs it

    launches = {"straight": launch("straight", command(straight_yaml), nproc, work, launcher)}
    after_kill: dict[str, str] = {}
    if launches["straight"].ok:
        launches["killed"] = launch("killed", command(resumed_yaml), nproc, work, launcher,
                                    kill_at=KILL_AT_CHECKPOINT, fault_file=work / "fault.json")
        after_kill = inspect_checkpoints(work / "runs" / "resumed" / "checkpoints")
        launches["resumed"] = launch("resumed", command(resumed_yaml), nproc, work, launcher)
    timings.update({name: run.seconds for name, run in launches.items()})
    runs = Runs(plan, work, rehearsed, work / "runs" / "straight", work / "runs" / "resumed", launches,
                kill_step=KILL_AT_CHECKPOINT, resume_step=CHECKPOINT_EVERY, after_kill=after_kill)
    checked = time.monotonic()
    report = RehearsalReport(str(config), work, plan, run_checks(runs), launcher=launcher, timings=timings)
    report.timings["checks"] = time.monotonic() - checked
    report.seconds = time.monotonic() - started
    (work / "checklist.txt").write_text(report.text())
    (work / "rehearsal.json").write_text(jsonio.dumps(report.to_dict(), indent=2))
    return report
