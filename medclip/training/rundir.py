"""A run directory belongs to one run: its lock, its run id, and what a fresh run finds there.

Every run has a run id, kept across resumes (its lineage): ``recipe.yaml`` names it in its first line,
every checkpoint and every ``log.jsonl`` record carries it. A fresh run into a directory holding
another run's checkpoints or export stops, unless ``--overwrite`` removes that run's files first. A
lock file (``run.lock``: PID, host) keeps a second process out of a live run; the lock of a process
that no longer runs on this host (a killed run) is taken over, with a log line.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import yaml

from medclip import jsonio
from medclip.errors import MedclipError
from medclip.training import checkpoint as ckpt

log = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
RECIPE_NAME = "recipe.yaml"
RUN_ID_LINE = re.compile(r"^# run_id: (\w+)")
# What a run writes into its directory; --overwrite removes these (the demo set and built shards are
# input data, reused by the next run).
RUN_OUTPUTS = ("checkpoints", "log.jsonl", "export", "eval", "tensorboard", "curves.png", "summary.txt",
               RECIPE_NAME)
DIVERGED_RE = re.compile(r"^step_\d+\.diverged\.pt$")
TAKE_OVER_ATTEMPTS = 5
UNREADABLE_LOCK_SECONDS = 5.0  # a lock still empty after this long was left by a killed process


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def read_run_id(output_dir: Path) -> str | None:
    """The run id in ``recipe.yaml``'s first line (None: no recipe, or one written by an earlier medclip)."""
    path = Path(output_dir) / RECIPE_NAME
    if not path.is_file():
        return None
    with open(path) as fh:
        match = RUN_ID_LINE.match(fh.readline())
    return match.group(1) if match else None


def write_recipe(output_dir: Path, recipe: dict, run_id: str) -> None:
    """``recipe.yaml``: the run id as a comment (the file stays a recipe `--config` reads), then the recipe."""
    header = f"# run_id: {run_id} (the run this directory belongs to; its checkpoints and log.jsonl carry it)\n"
    (Path(output_dir) / RECIPE_NAME).write_text(header + yaml.safe_dump(recipe, sort_keys=False))


def previous_run(output_dir: Path) -> str | None:
    """What an earlier run left that a fresh run would mix with (None when there is nothing)."""
    output_dir = Path(output_dir)
    folder = ckpt.checkpoint_dir(output_dir)
    found = ckpt.list_checkpoints(output_dir)
    diverged = [p for p in folder.iterdir() if DIVERGED_RE.match(p.name)] if folder.is_dir() else []
    if found or diverged:
        newest = f", newest {found[-1].name}" if found else ""
        return f"{len(found) + len(diverged)} checkpoint(s) of another run{newest}"
    if (output_dir / "export").is_dir():
        return "the export of another run"
    return None


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite: remove the earlier run's outputs (checkpoints, log, export, evaluation, report)."""
    removed = []
    for name in RUN_OUTPUTS:
        path = Path(output_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    if removed:
        log.info("--overwrite: removed the earlier run's %s from %s", ", ".join(removed), output_dir)


def fresh_run_problem(output_dir: Path, overwrite: bool) -> str | None:
    """Why a fresh run (no --resume) may not start in ``output_dir`` (None when it may)."""
    found = previous_run(output_dir)
    if found is None or overwrite:
        return None
    return (f"run.output_dir {output_dir} already holds {found}; continue it with --resume latest, choose "
            f"another run.output_dir, or pass --overwrite to remove that run's files and start afresh")


def lineage_problem(checkpoint: Path, checkpoint_run: str | None, owner: str | None, output_dir: Path) -> str | None:
    """Why resuming ``checkpoint`` into ``output_dir`` (whose recipe.yaml names run ``owner``) would mix two runs."""
    if checkpoint_run is None or owner is None or checkpoint_run == owner:
        return None
    return (f"--resume: {checkpoint} belongs to run {checkpoint_run}, but {output_dir} holds run {owner} "
            f"(its recipe.yaml); resume a checkpoint of run {owner}, or resume into another run.output_dir")


def resumed_run_id(checkpoint: Path, checkpoint_run: str | None, owner: str | None) -> str:
    """The run a resume continues: the checkpoint's; one written by an earlier medclip has none (adopted)."""
    if checkpoint_run is not None:
        return checkpoint_run
    run_id = owner or new_run_id()
    log.info("%s has no run id (written by an earlier medclip version); resuming it as run %s", checkpoint, run_id)
    return run_id


class RunLock:
    """``run.lock`` in the output directory: held by rank 0 of the run that writes there."""

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_NAME
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex}
        self.held = False

    def acquire(self) -> None:
        """Take the lock, or raise one MedclipError naming the live process that holds it."""
        text = jsonio.dumps(self.owner)
        for _ in range(TAKE_OVER_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            self.held = True
            return
        raise MedclipError(f"could not take the lock {self.path}: other processes keep taking it; retry")

    def release(self) -> None:
        if self.held and _read_lock(self.path) == self.owner:  # never remove a lock another process took over
            self.path.unlink(missing_ok=True)
        self.held = False

    def _take_over_if_stale(self) -> None:
        holder = _read_lock(self.path)
        if holder is None:
            return  # removed meanwhile: try again
        if not holder and _age(self.path) < UNREADABLE_LOCK_SECONDS:
            time.sleep(0.2)  # created, its owner not written yet
            return
        pid, host = holder.get("pid"), holder.get("host", self.owner["host"])  # unreadable and old: stale
        if host != self.owner["host"]:
            raise MedclipError(f"run.output_dir {self.path.parent} is in use by process {pid} on host {host} "
                               f"({self.path}); if that run no longer runs, delete {self.path}")
        if isinstance(pid, int) and ckpt.process_alive(pid):
            raise MedclipError(f"run.output_dir {self.path.parent} is in use by another run (process {pid} on "
                               f"this host, {self.path}); wait for it to end, or choose another run.output_dir")
        # Rename, then check that what we moved is the stale lock we read: of two processes taking over at
        # once, only one moves it; the other may have moved the winner's fresh lock, and puts it back.
        grabbed = self.path.with_name(f".{LOCK_NAME}.stale-{os.getpid()}")
        try:
            os.rename(self.path, grabbed)
        except FileNotFoundError:
            return
        if _read_lock(grabbed) != holder:
            try:
                os.link(grabbed, self.path)
            except FileExistsError:
                pass
        else:
            whose = "an earlier run in this process" if pid == os.getpid() else f"process {pid}, no longer running"
            log.info("taking over the lock %s left by %s", self.path, whose)
        grabbed.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    """The lock's owner; None when there is no lock, {} when its content is unreadable."""
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0
