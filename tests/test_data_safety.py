"""Data failing safe: untrusted manifests run no commands, shard failures of any kind are counted skips,
`data check` reads what it checks, and loader workers die with their parent."""

from __future__ import annotations

import io
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from torchvision import transforms

from medclip.cli import main as cli_main
from medclip.data.demo import build_demo
from medclip.data.manifest import Manifest, expand_urls, load_manifest
from medclip.data.stream import build_train_stream
from medclip.errors import MedclipError

REPO = Path(__file__).resolve().parent.parent
TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety")
    build_demo(out, n_train=40, n_val=60, image_size=32, shard_samples=30)  # val: 2 shards of 30
    return out


def _write_manifest(path: Path, urls, **fields) -> Path:
    path.write_text(yaml.safe_dump({"name": path.stem, "urls": urls, **fields}))
    return path


def _keys(stream) -> list[str]:
    return [k for batch in stream for k in batch["keys"]]


# ------------------------------------------------------------------------------ trust boundary


def test_pipe_manifest_is_refused_without_opt_in_and_nothing_runs(demo, tmp_path, tiny_encoder, capsys, caplog):
    marker = tmp_path / "ran"
    manifest = _write_manifest(tmp_path / "piped.yaml", f"pipe:touch {marker} && cat {{root}}/demo-val-{{000000..000001}}.tar",
                               root=str(demo))
    with pytest.raises(MedclipError, match="--allow-pipe"):
        build_train_stream([manifest], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, num_workers=2)
    assert cli_main(["data", "check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert f"RUNS piped: 2 shell command(s): touch {marker} && cat {shlex.quote(str(demo))}/demo-val-{{000000..000001}}.tar" in out
    assert "not run: read them with --allow-pipe" in out
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": {"name": "medclip-tiny"}, "data": {"sources": [{"manifest": str(manifest)}]},
                                      "run": {"output_dir": str(tmp_path / "run"), "steps": 1, "device": "cpu",
                                              "progress": False}}))
    assert cli_main(["pretrain", "--config", str(recipe)]) == 2
    assert "--allow-pipe" in capsys.readouterr().err
    assert not marker.exists()  # nothing ran

    # opted in: the command runs, is shown once, and its shards are read
    assert cli_main(["data", "check", str(manifest), "--allow-pipe"]) == 0
    assert marker.exists()
    marker.unlink()
    with caplog.at_level(logging.WARNING, logger="medclip.data.manifest"):
        stream = build_train_stream([manifest], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, num_workers=2,
                                    allow_pipe=True)
    assert len(set(_keys(stream))) == 60 and marker.exists()
    shown = [r.getMessage() for r in caplog.records if "shell command" in r.getMessage()]
    assert len(shown) == 1 and f"touch {marker}" in shown[0]
    for flags, allowed in (([], False), (["--allow-pipe"], True)):  # what `medclip pretrain` resolves
        capsys.readouterr()
        assert cli_main(["pretrain", "--config", str(recipe), "--print-recipe", *flags]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["data"]["allow_pipe"] is allowed


def test_a_malicious_root_is_quoted_and_runs_nothing(demo, tmp_path, tiny_encoder, monkeypatch):
    marker = tmp_path / "injected"
    manifest = _write_manifest(tmp_path / "benign.yaml", "pipe:cat {root}/demo-val-000000.tar")
    evil = f"{demo}/x; touch {marker}; echo "
    for root_from_env in (False, True):
        if root_from_env:
            monkeypatch.setenv("MEDCLIP_DATA_ROOT", evil)
        m = load_manifest(manifest, root=None if root_from_env else evil)
        stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, allow_pipe=True)
        with pytest.raises(MedclipError, match="no training data could be read: every shard failed"):
            _keys(stream)  # cat of a file named after the whole root: fails, counted, nothing else runs
        assert not marker.exists()
    monkeypatch.delenv("MEDCLIP_DATA_ROOT")
    # a root with a space, a quote and braces is taken literally, in a command and in a plain path
    odd = tmp_path / "my data {a,b} it's"
    odd.mkdir()
    shutil.copy(demo / "demo-val-000000.tar", odd)
    with tarfile.open(demo / "demo-val-000000.tar") as tar:
        samples = len({n.split(".")[0] for n in tar.getnames()})
    for pattern in ("pipe:cat {root}/demo-val-000000.tar", "{root}/demo-val-000000.tar"):
        m = load_manifest(_write_manifest(tmp_path / "odd.yaml", pattern), root=str(odd))
        assert len(m.urls) == 1
        stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, allow_pipe=True)
        assert len(_keys(stream)) == samples and stream.skip_counts() == {}
    assert expand_urls("{root}/s-{0..1}.tar", "/d/{x,y}") == ["/d/{x,y}/s-0.tar", "/d/{x,y}/s-1.tar"]


def test_pipe_urls_are_recognised_as_webdataset_dispatches_them(demo, tmp_path, tiny_encoder):
    """webdataset picks the opener by urllib's scheme (case-folded, leading blanks dropped): PIPE:... is a
    pipe: URL too, refused without the opt-in (and never run: only the python -O of an assert stood between)."""
    marker = tmp_path / "ran"
    for url in (f"PIPE:touch {marker}", f" pipe:;touch {marker}", f"Pipe:touch {marker}"):
        manifest = _write_manifest(tmp_path / "odd.yaml", url)
        with pytest.raises(MedclipError, match="--allow-pipe"):
            build_train_stream([manifest], tiny_encoder.tokenizer, TRANSFORM, batch_size=8)
    assert not marker.exists()


def test_a_root_cannot_turn_a_plain_manifest_into_a_command(demo, tmp_path, monkeypatch):
    """{root} first in a plain pattern: a root starting with pipe: would make it a shell command, which
    --allow-pipe (given for some other, trusted manifest) would then run."""
    manifest = _write_manifest(tmp_path / "plain.yaml", "{root}/demo-val-000000.tar")
    evil = f"pipe:touch {tmp_path / 'injected'}; cat {demo}"
    with pytest.raises(MedclipError, match="would make .* a shell command") as info:
        load_manifest(manifest, root=evil)
    assert "\n" not in str(info.value)
    monkeypatch.setenv("MEDCLIP_DATA_ROOT", evil)
    with pytest.raises(MedclipError, match="would make .* a shell command"):
        load_manifest(manifest)


# ------------------------------------------------------------------------------ shard failures are skips


@pytest.mark.parametrize("workers", [0, 2])
def test_failing_pipe_shards_are_skipped_and_counted(demo, tiny_encoder, workers):
    head = (demo / "demo-val-000001.tar").stat().st_size // 2
    m = Manifest("piped", [f"pipe:cat {demo}/demo-val-000000.tar", "pipe:exit 3", f"pipe:cat {demo}/gone.tar",
                           f"pipe:head -c {head} {demo}/demo-val-000001.tar"])
    stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, num_workers=workers,
                                allow_pipe=True)
    keys = _keys(stream)
    counts = stream.skip_counts()
    assert counts == {"unreadable_shard": 2, "truncated_tar": 1}
    with tarfile.open(demo / "demo-val-000000.tar") as tar:
        whole = {n.name.split(".")[0] for n in tar.getmembers()}
    assert whole <= set(keys) and 30 < len(keys) < 60  # shard 0 whole, the front half of shard 1


def test_each_failed_shard_is_one_readable_log_line(demo, tmp_path, caplog):
    """One warning per failed shard, naming it and the cause (not webdataset's wrapper objects twice)."""
    from collections import Counter

    from medclip.data.shard_reader import read_shard

    with tarfile.open(demo / "demo-val-000000.tar") as tar:
        inside = tar.getmembers()[2].offset_data + 10
    cut = tmp_path / "cut.tar"
    cut.write_bytes((demo / "demo-val-000000.tar").read_bytes()[:inside])
    urls = ["pipe:exit 3", f"pipe:cat {demo}/gone.tar", str(cut), str(tmp_path / "missing.tar")]
    skips: Counter = Counter()
    with caplog.at_level(logging.WARNING, logger="medclip.data.shard_reader"):
        for url in urls:
            list(read_shard(url, lambda i: True, skips, allow_commands=True))
    lines = [r.getMessage() for r in caplog.records]
    assert skips == {"unreadable_shard": 3, "truncated_tar": 1}
    assert len(lines) == len(urls), lines
    for url, line in zip(urls, lines):
        assert url in line and "\n" not in line and " object at 0x" not in line, line
    assert "exited with status 3" in lines[0] and "truncated_tar" in lines[2]


class _BrokenConnection(io.RawIOBase):
    """A remote file whose connection drops after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int):
        self.data, self.limit, self.pos = data, limit, 0

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.pos >= self.limit:
            raise ConnectionResetError("connection reset by peer")
        n = min(len(buffer), self.limit - self.pos)
        buffer[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def test_failing_fsspec_reads_are_skipped_and_counted(demo, tiny_encoder, monkeypatch):
    import fsspec

    data = (demo / "demo-val-000001.tar").read_bytes()

    def fake_open(url, mode="rb", **kw):  # fsspec.open's public signature; s3fs is not needed
        if url.endswith("refused.tar"):
            raise PermissionError("403 Forbidden")
        return type("OpenFile", (), {"open": lambda self: io.BufferedReader(_BrokenConnection(data, len(data) // 2))})()

    monkeypatch.setattr(fsspec, "open", fake_open)
    m = Manifest("remote", [str(demo / "demo-val-000000.tar"), "s3://bucket/dropped.tar", "s3://bucket/refused.tar"])
    stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, shuffle_buffer=0)
    keys = _keys(stream)
    assert stream.skip_counts() == {"unreadable_shard": 2}
    assert 30 < len(keys) < 60


def test_nothing_readable_stops_with_one_line(demo, tiny_encoder):
    m = Manifest("gone", [str(demo / "nope-0.tar"), str(demo / "nope-1.tar"), str(demo / "nope-2.tar")])
    stream = build_train_stream([m], tiny_encoder.tokenizer, TRANSFORM, batch_size=8, num_workers=2)
    with pytest.raises(MedclipError) as info:
        _keys(stream)
    assert str(info.value).count("\n") == 0 and "every shard failed (3 unreadable_shard;" in str(info.value)


# ------------------------------------------------------------------------------ data check reads every shard


def test_data_check_fails_truncated_shards_without_counts(demo, tmp_path, capsys, caplog):
    src = (demo / "demo-val-000000.tar").read_bytes()
    with tarfile.open(demo / "demo-val-000000.tar") as tar:
        members = tar.getmembers()
    cuts = {"header": members[9].offset,  # a whole member boundary: tarfile's stream mode stops there silently
            "data": members[9].offset_data + 10}
    for where, cut in cuts.items():
        shard = tmp_path / f"cut-{where}-000000.tar"
        shard.write_bytes(src[:cut])
        manifest = _write_manifest(tmp_path / f"cut-{where}.yaml", str(shard))  # no samples, shards or summary
        caplog.clear()
        assert cli_main(["data", "check", str(manifest)]) == 1, where
        out = capsys.readouterr().out
        # once, on its FAIL line, with the cause (not also as a training-style "skipped shard" warning)
        assert f"FAIL cut-{where}: truncated tar {shard}: " in out and out.count(str(shard)) == 1, out
        assert not [r for r in caplog.records if str(shard) in r.getMessage()]
    whole = _write_manifest(tmp_path / "whole.yaml", str(demo / "demo-val-000000.tar"))
    assert cli_main(["data", "check", str(whole)]) == 0
    assert "OK   whole: 1 shards read to their end, no sample count stated" in capsys.readouterr().out


# ------------------------------------------------------------------------------ workers die with their parent

_ITERATE = """
import multiprocessing, sys, time
import medclip
from torchvision import transforms
from medclip.data.manifest import Manifest
from medclip.data.stream import build_train_stream

enc = medclip.load("medclip-tiny")
source = Manifest("train", sys.argv[1:])
stream = build_train_stream([source], enc.tokenizer, transforms.Compose([transforms.Resize((32, 32)),
                            transforms.ToTensor()]), batch_size=40, num_workers=2, shuffle_buffer=0)
batches = iter(stream)
next(batches)
time.sleep(3)  # the workers fill their prefetch queue meanwhile
print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loader_workers_exit_when_their_process_is_killed(tmp_path):
    out = tmp_path / "big"
    build_demo(out, n_train=480, n_val=0, image_size=32, shard_samples=120)
    shards = sorted(str(p) for p in out.glob("demo-train-*.tar"))
    proc = subprocess.Popen([sys.executable, "-c", _ITERATE, *shards], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        workers = [int(p) for p in proc.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = [p for p in workers if _alive(p)]
    finally:
        proc.kill()
        proc.wait()
    for pid in survivors:  # do not leave them behind when the check fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"loader workers still alive 10 s after their parent was killed: {survivors}"
