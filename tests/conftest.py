"""Shared fixtures. Real data is read in place from ../shared/data (never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MEDCLIP_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def require_shared(*parts: str) -> Path:
    """Path under ../shared/data; missing data fails under CI and skips elsewhere."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"real test data missing: {path} (expected ../shared/data beside the repository)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def one_error_line(stderr: str) -> str:
    """A failed command's output ends in exactly one `medclip: error:` line and holds no traceback."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr, stderr
    assert lines and [x for x in lines if x.startswith("medclip: error: ")] == [lines[-1]], stderr
    return lines[-1]


@pytest.fixture
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def tiny_encoder():
    import medclip

    torch.manual_seed(0)
    return medclip.load("medclip-tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_bert_encoder():
    import medclip

    torch.manual_seed(0)
    return medclip.load("medclip-tiny-bert", device="cpu")
