"""Launching a rehearsal's runs: N processes of ``medclip pretrain``, observed and, once, killed.

Each process runs the ordinary command (``medclip.cli.main(["pretrain", "--config", ...])``) and hands
the trainer two observers (``observers.py``), as callbacks and checkpoint writer:

* a key recorder: after every optimisation step, the step number and the sample keys of the
  process's batch are appended to ``KEYS_DIR/LAUNCH-rankR.jsonl`` (flushed, so a kill keeps them);
* fault injection (the killed run only): rank 0 sends itself SIGKILL half-way through writing
  the checkpoint of a given step (half of the serialised bytes are on disk), the way a node dies;
  if no checkpoint is written at that step, it dies at the start of the next step instead.

Two launchers start the processes. ``fork`` (CPU default) forks them from the current process,
which has torch and medclip imported already (a fresh interpreter costs seconds of imports per
process); each rank leads its own process group, so it and its data-loader workers can be ended
together. ``torchrun`` (CUDA default) starts ``torch.distributed.run`` with this module as the
entry point, exactly as a cluster job does. Either way, when one process dies the others are
ended, as torchrun's agent does. A forked run in which no process writes a log line or finishes
a step for ten minutes is hung (mismatched collectives wait forever): every rank's Python stacks
go to its log (faulthandler, SIGUSR1) and the run is ended.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LAUNCHERS = ("fork", "torchrun")


# ----------------------------------------------------------------------------- inside a rank

def _run_rank(argv: list[str], keys_file: Path, kill_at_checkpoint: int | None, fault_file: Path | None) -> int:
    from medclip.cli import main
    from medclip.training.rehearsal.observers import FaultInjector, KeyRecorder

    callbacks, writer = [KeyRecorder(keys_file)], None
    if kill_at_checkpoint is not None and int(os.environ.get("RANK", "0")) == 0:
        injector = FaultInjector(kill_at_checkpoint, fault_file)
        callbacks.append(injector)
        writer = injector.write
    return main(argv, callbacks=callbacks, checkpoint_writer=writer)


def _forked_rank(rank: int, world: int, port: int, argv: list[str], log_file: str, keys_file: str,
                 kill_at_checkpoint: int | None, fault_file: str | None, threads: int) -> None:
    os.setpgid(0, 0)  # this rank and its data-loader workers: one group to end together
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads))
    log = open(log_file, "w", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    import logging

    import torch

    logging.root.handlers.clear()  # the parent's handlers (a test runner's) do not belong to this process
    faulthandler.register(signal.SIGUSR1, file=log, all_threads=True)  # the launcher asks for stacks of a stalled run
    torch.set_num_threads(threads)
    code = _run_rank(argv, Path(keys_file), kill_at_checkpoint, Path(fault_file) if fault_file else None)
    log.flush()
    sys.exit(code)


def main(args: list[str] | None = None) -> int:
    """Entry point under torchrun: ``python -m medclip.training.rehearsal.launch --keys-dir D ... -- pretrain ...``."""
    parser = argparse.ArgumentParser(prog="medclip.training.rehearsal.launch")
    parser.add_argument("--keys-dir", required=True)
    parser.add_argument("--launch", required=True)
    parser.add_argument("--kill-at-checkpoint", type=int, default=None)
    parser.add_argument("--fault-file", default=None)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    ns = parser.parse_args(args)
    argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    keys = Path(ns.keys_dir) / f"{ns.launch}-rank{os.environ.get('RANK', '0')}.jsonl"
    return _run_rank(argv, keys, ns.kill_at_checkpoint, Path(ns.fault_file) if ns.fault_file else None)


# ----------------------------------------------------------------------------- the parent

STALL_SECONDS = 600  # no log line and no finished step for this long: the run is hung


@dataclass
class Launch:
    name: str
    exit_codes: list[int]
    logs: list[Path]
    seconds: float
    stalled: bool = False

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.exit_codes)

    def error_line(self) -> str:
        """The last error-looking line of the logs (what the user would see first)."""
        if self.stalled:
            return (f"no progress for {STALL_SECONDS} s: hung (the stacks of every process are at the end of "
                    f"{', '.join(str(p) for p in self.logs)})")
        for log in self.logs:
            lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
            for line in reversed(lines):
                if "error" in line.lower() or "Error" in line:
                    return f"{log.name}: {line.strip()}"
        return f"exit codes {self.exit_codes}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _end_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _fork_launch(name: str, argv: list[str], nproc: int, work: Path, kill_at: int | None, fault_file: Path | None,
                 timeout: float) -> tuple[list[int], list[Path], bool]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = _free_port()
    threads = max(1, (os.cpu_count() or 1) // nproc)
    logs = [work / "logs" / f"{name}-rank{r}.log" for r in range(nproc)]
    logs[0].parent.mkdir(parents=True, exist_ok=True)
    procs = []
    for rank in range(nproc):
        p = ctx.Process(target=_forked_rank, name=f"rehearsal-{name}-rank{rank}",
                        args=(rank, nproc, port, argv, str(logs[rank]), str(work / "keys" / f"{name}-rank{rank}.jsonl"),
                              kill_at, str(fault_file) if fault_file else None, threads))
        p.start()
        try:
            os.setpgid(p.pid, p.pid)  # also from the parent: no window in which the child is in ours
        except (ProcessLookupError, PermissionError):
            pass
        procs.append(p)
    deadline = time.monotonic() + timeout
    watched = [*logs, *(work / "keys" / f"{name}-rank{r}.jsonl" for r in range(nproc))]
    stalled = False
    try:
        while any(p.exitcode is None for p in procs):
            failed = any(p.exitcode not in (None, 0) for p in procs)
            stalled = stalled or time.time() - _last_change(watched) > STALL_SECONDS
            if stalled:
                _dump_stacks(procs)
            if failed or stalled or time.monotonic() > deadline:
                for p in procs:
                    _end_group(p.pid)  # one died (or hung, or time is up): end the others, as torchrun's agent does
            time.sleep(0.2)
    finally:
        for p in procs:
            p.join(timeout=10)
            _end_group(p.pid)  # data-loader workers a killed rank left behind
    return [p.exitcode for p in procs], logs, stalled


def _last_change(paths: list[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.exists()), default=time.time())


def _dump_stacks(procs) -> None:
    """faulthandler writes every thread's Python stack into the rank's log (registered in _forked_rank)."""
    for p in procs:
        if p.exitcode is None:
            try:
                os.kill(p.pid, signal.SIGUSR1)
            except ProcessLookupError:
                pass
    time.sleep(2)


def _torchrun_launch(name: str, argv: list[str], nproc: int, work: Path, kill_at: int | None,
                     fault_file: Path | None, timeout: float) -> tuple[list[int], list[Path], bool]:
    log = work / "logs" / f"{name}-torchrun.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--log-dir", str(work / "logs" / name), "--redirects", "3",
           "-m", "medclip.training.rehearsal.launch", "--keys-dir", str(work / "keys"), "--launch", name]
    if kill_at is not None:
        cmd += ["--kill-at-checkpoint", str(kill_at), "--fault-file", str(fault_file)]
    cmd += ["--", *argv]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = -signal.SIGKILL
        finally:
            _end_group(proc.pid)
    rank_logs = sorted((work / "logs" / name).rglob("std*.log"))
    return [code], [log, *rank_logs], False


def launch(name: str, argv: list[str], nproc: int, work: Path, launcher: str = "fork", kill_at: int | None = None,
           fault_file: Path | None = None, timeout: float = 1800) -> Launch:
    """Run ``medclip <argv>`` in ``nproc`` processes; keys and logs go under ``work``."""
    started = time.monotonic()
    run = _fork_launch if launcher == "fork" else _torchrun_launch
    codes, logs, stalled = run(name, argv, nproc, work, kill_at, fault_file, timeout)
    return Launch(name, codes, logs, time.monotonic() - started, stalled)


if __name__ == "__main__":
    sys.exit(main())
