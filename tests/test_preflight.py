"""A run checks at start what it will need, and stops before its first step with one line."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import one_error_line  # tests/ is on sys.path under pytest

from medclip.errors import MedclipError
from medclip.training import preflight
from medclip.training.config import load_recipe


def _recipe(tmp_path: Path, *overrides: str):
    return load_recipe("demo", [f"run.output_dir={tmp_path / 'run'}", *overrides])


def test_shipped_demo_recipe_passes(tmp_path):
    preflight.check(_recipe(tmp_path))
    assert not (tmp_path / "run").exists()  # probed, then tidied away


def test_every_problem_in_one_line(tmp_path):
    recipe = _recipe(tmp_path, "eval.suites=[demo, nope]", "data.sources=[{manifest: unimed-chexpert, root: /nowhere}]",
                     "run.wandb=true")
    with pytest.raises(MedclipError) as err:
        preflight.check(recipe)
    message = str(err.value)
    assert "\n" not in message and message.startswith("the run cannot start: ")
    assert "unknown suite 'nope'" in message
    assert "manifest unimed-chexpert: none of its 23 shards exist (first: /nowhere/chexpert/chexpert-000000.tar)" in message
    if preflight.importlib.util.find_spec("wandb") is None:
        assert "wandb is not installed (pip install wandb, or set run.wandb: false)" in message


def test_eval_data_is_checked(tmp_path):
    with pytest.raises(MedclipError, match="suite unimed21 has no data root: set eval.root"):
        preflight.check(_recipe(tmp_path, "eval.suites=[unimed21]", "eval.root=null"))
    (tmp_path / "unimed" / "chexpert-5x200").mkdir(parents=True)
    with pytest.raises(MedclipError, match=r"suite unimed21: no data for 20 of its 21 datasets under .*unimed "
                                           r"\(rsna_pneumonia, CT_axial, CT_coronal, \.\.\.; first missing: .*rsna_pneumonia\)"):
        preflight.check(_recipe(tmp_path, "eval.suites=[unimed21]", f"eval.root={tmp_path / 'unimed'}"))
    # the demo suite's data is written by the run itself under output_dir: checked after data preparation
    from medclip.data.demo import build_demo

    recipe = _recipe(tmp_path, "eval.suites=[demo, unimed21]")
    preflight.check(recipe)
    build_demo(tmp_path / "run" / "demo_data", n_train=8, n_val=8, image_size=48)  # what the run builds
    with pytest.raises(MedclipError) as err:
        preflight.check_made_data(recipe)
    assert "suite unimed21: no data for 21 of its 21 datasets under" in str(err.value)
    assert "suite demo" not in str(err.value)


def test_output_dir_under_a_regular_file(tmp_path):
    (tmp_path / "file").write_text("x")
    recipe = load_recipe("demo", [f"run.output_dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(MedclipError, match=r"run.output_dir .*file/run is not writable: Not a directory: .* \(a part "
                                           r"of the path is a regular file, not a directory: choose another path\)"):
        preflight.check(recipe)


def test_output_dir_on_a_read_only_file_system(tmp_path, monkeypatch):
    target = tmp_path / "ro"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):  # what a read-only mount answers
        if self == target or target in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(MedclipError, match="Read-only file system: .* \\(the file system is read-only"):
        preflight.check(load_recipe("demo", [f"run.output_dir={target / 'run'}"]))


def test_disk_space_for_one_checkpoint(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path)
    parameters = preflight.count_parameters(recipe)
    assert 7e6 < parameters < 8e6  # medclip-tiny, counted on the meta device
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**7, 10**7))
    with pytest.raises(MedclipError, match=r"not enough disk space in .*run: a checkpoint and the export of "
                                           r"medclip-tiny \(7.6M parameters\) need about 12\d MB, 10 MB is free"):
        preflight.check(recipe)


def test_unknown_suite_stops_before_step_one(tmp_path):
    """The CLI run: one line, exit 2, nothing trained, the demo set not even built."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "medclip", "pretrain", "--config", "demo", "--set",
                           "eval.suites=[demo, demo_typo]", "--set", f"run.output_dir={out}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert line.startswith("medclip: error: the run cannot start: unknown suite 'demo_typo' (not a file, nor a "
                           "shipped suite; shipped: covid, demo, shared_real, unimed21")
    assert not out.exists()  # nothing trained, the demo set not even built


def test_unwritable_output_dirs_are_one_line_and_exit_2_from_the_cli(tmp_path, monkeypatch, capsys):
    """Under a regular file, and on a read-only mount (its EROFS answer): `medclip pretrain` says it in one line."""
    from medclip.cli import main

    (tmp_path / "file").write_text("x")
    read_only, real_mkdir = tmp_path / "ro", Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self == read_only or read_only in self.parents:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    for out, fix in ((tmp_path / "file" / "run", "a part of the path is a regular file"),
                     (read_only / "run", "the file system is read-only: choose a writable location")):
        assert main(["pretrain", "--config", "demo", "--set", f"run.output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medclip: error: the run cannot start: ") and fix in err[0], err


def test_start_weights_by_zoo_name_path_or_nothing(tmp_path):
    """A zoo model's name alone is left to medclip.load (a cached snapshot or a download); a path must exist."""
    assert preflight.check_start_weights(_recipe(tmp_path, "model.checkpoint=biomedclip")) == []
    assert preflight.check_start_weights(_recipe(tmp_path, f"model.checkpoint=biomedclip={tmp_path}")) == []
    assert preflight.check_start_weights(_recipe(tmp_path)) == []
    missing = tmp_path / "nope"
    for spec in (missing, f"biomedclip={missing}"):
        [problem] = preflight.check_start_weights(_recipe(tmp_path, f"model.checkpoint={spec}"))
        assert problem.startswith(f"model.checkpoint {missing} does not exist") and "zoo model's name" in problem
