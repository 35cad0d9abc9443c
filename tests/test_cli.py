"""The `medclip` command: fast help and version, one line for every failure, --debug tracebacks."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_error_line  # tests/ is on sys.path under pytest

import medclip
from medclip import cli, info
from medclip.errors import MedclipError, worker_message

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "open_clip", "transformers", "timm", "torchvision", "sklearn", "matplotlib")

# Runs every `--help` (top level and each subcommand at every depth) and `--version` in one fresh
# interpreter, then reports which heavy modules got imported.
HELP_SCRIPT = r"""
import argparse, contextlib, io, json, sys
from medclip.cli import build_parser, main

def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from commands(sub, prefix + (name,))

argvs = [["--help"], ["--version"]] + [[*c, "--help"] for c in commands(build_parser())]
outputs = {}
for argv in argvs:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 0, (argv, exc.code)
    outputs[" ".join(argv)] = out.getvalue()
print(json.dumps({"heavy": sorted(m for m in %r if m in sys.modules), "outputs": outputs}))
"""


def test_help_version_and_every_subcommand_help_import_no_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT % (HEAVY,)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    outputs = report["outputs"]
    assert outputs["--version"].strip() == f"medclip {medclip.__version__}"
    assert "usage: medclip" in outputs["--help"] and "--debug" in outputs["--help"]
    # every level of subcommand was reached, e.g. `medclip eval suite --help` and `medclip data check --help`
    assert {"pretrain --help", "eval suite --help", "data check --help", "list --help", "info --help"} <= set(outputs)


IMPORT_SCRIPT = """
import sys
finders = list(sys.meta_path)
import medclip
light = "torch" not in sys.modules and "open_clip" not in sys.modules and sys.meta_path == finders
import open_clip
before = "medclip-tiny" in open_clip.list_models()
medclip.register_model_configs()
import webdataset
schemes = dict(webdataset.gopen_schemes)
import medclip.data.shard_reader
print(light, before, open_clip.get_model_config("medclip-tiny")["embed_dim"],
      open_clip.create_model("medclip-tiny").visual.image_size, medclip.evaluation.retrieval.__name__,
      dict(webdataset.gopen_schemes) == schemes)
"""


def test_import_medclip_is_light_and_changes_nothing_outside_it(tmp_path):
    env = {**os.environ, "MEDCLIP_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    env.pop("XDG_CACHE_HOME", None)
    proc = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    # light import and no import hook; open_clip learns medclip-tiny from register_model_configs(), in memory;
    # a lazy package name that is also a submodule (medclip.evaluation.retrieval) is still the function, as
    # with an eager import; reading shards leaves webdataset's global URL-scheme table as it was
    assert proc.stdout.split() == ["True", "False", "128", "(64,", "64)", "retrieval", "True"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == []  # nothing written anywhere


def test_list_shows_shipped_recipes_suites_and_manifests(capsys):
    assert cli.main(["list", "recipes", "suites", "manifests"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "shared_real", "unimed_vitb16", "unimed21", "unimed-chexpert", "medconcept-23m"):
        assert f"  {name} " in out
    assert cli.main(["list", "recipes", "--paths"]) == 0
    assert str(REPO / "pretrain" / "demo.yaml") in capsys.readouterr().out
    assert cli.main(["list", "nonsense"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "medclip: error: unknown section 'nonsense'; choose from recipes, suites, manifests, models, pretrained"]


def test_unexpected_exception_is_one_line_with_a_debug_hint(monkeypatch, capsys):
    def broken(args):
        raise RuntimeError("something inside broke\nsecond line")

    monkeypatch.setattr(info, "run_list", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert cli.main(["list"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line == ("medclip: error: unexpected RuntimeError: something inside broke second line "
                    "(a bug? rerun with --debug for the traceback and report it)")
    # --debug anywhere on the line, or MEDCLIP_DEBUG=1, prints the traceback before the same line
    assert cli.main(["list", "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and 'raise RuntimeError("something inside broke' in err
    assert err.strip().splitlines()[-1] == line
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(["list"]) == 1
    assert "Traceback (most recent call last)" in capsys.readouterr().err


@pytest.mark.parametrize("code, fix", [
    (errno.EROFS, "the file system is read-only: choose a writable location"),
    (errno.ENOSPC, "no space left on the device: free some space or choose another disk"),
    (errno.EACCES, "no permission: choose a location you can write to, or fix its permissions"),
])
def test_os_errors_are_one_line_with_the_fix(monkeypatch, capsys, code, fix):
    def failing(args):
        raise OSError(code, os.strerror(code), "/data/out/x")

    monkeypatch.setattr(info, "run_list", failing)
    assert cli.main(["list"]) == 2
    assert one_error_line(capsys.readouterr().err) == f"medclip: error: {os.strerror(code)}: /data/out/x ({fix})"


def test_worker_exceptions_are_reraised_as_their_own_line():
    wrapped = ('Caught MedclipError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n'
               '  File "x.py", line 3, in f\n    raise MedclipError("cannot read a.png: no image")\n'
               'medclip.errors.MedclipError: cannot read a.png: no image\n')
    assert str(MedclipError(wrapped)) == "cannot read a.png: no image"
    assert worker_message("plain message") == "plain message"


def test_eval_worker_failure_is_one_line_with_default_workers(tmp_path):
    """A folder holding a non-image file, two preprocessing workers (the default): one line, exit 2."""
    from PIL import Image

    for label in ("benign", "malignant"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (60 * i, 20, 20)).save(tmp_path / "imgs" / label / f"{i}.png")
    (tmp_path / "imgs" / "benign" / "notes.png").write_text("a text file with an image suffix")
    proc = subprocess.run([sys.executable, "-m", "medclip", "eval", "zero-shot", "--model", "medclip-tiny",
                           "--reader", "image_folder", "--data", "imgs", "--classes", "benign", "malignant",
                           "--out", "out", "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith(f"medclip: error: cannot read {tmp_path / 'imgs' / 'benign' / 'notes.png'}: ")
