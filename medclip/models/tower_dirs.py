"""Directories that describe a tower to the library that builds it.

open_clip builds an HF text tower from ``AutoConfig.from_pretrained(hf_model_name)`` and a timm
image tower from ``timm.create_model(timm_model_name)``; both accept a local directory (timm as
``local-dir:PATH``). When a checkpoint carries weights but no tower config (UniMed-CLIP, PMC-CLIP,
ConceptCLIP, MedSigLIP's SigLIP vision tower at 448 px), medclip writes the config it derived into a
content-addressed directory under its cache and points the model config there. Exports copy these
files beside the weights and name them relative to the export (see :func:`medclip.save`).
"""

from __future__ import annotations

from pathlib import Path

from medclip import jsonio
from medclip.models.cache import cached_dir

TIMM_PREFIX = "local-dir:"
# Files of a HF model directory that describe the tokenizer (weights and model config excluded).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "vocab.txt",
                   "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


def tokenizer_files(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    return [directory / name for name in TOKENIZER_FILES if (directory / name).is_file()]


def has_tokenizer(directory: str | Path) -> bool:
    return Path(directory).is_dir() and bool(tokenizer_files(directory))


def hf_tower_dir(config: dict, tokenizer_dir: str | Path | None = None) -> Path:
    """A directory holding ``config.json`` (and the tokenizer files of ``tokenizer_dir``, if given)."""
    files = {"config.json": jsonio.dumps(config, indent=2, sort_keys=True).encode()}
    for path in tokenizer_files(tokenizer_dir) if tokenizer_dir else []:
        files[path.name] = path.read_bytes()
    return cached_dir("towers", files)


def timm_tower_name(architecture: str, model_args: dict) -> str:
    """``local-dir:DIR`` for timm: a registered architecture built with ``model_args`` overrides."""
    config = {"architecture": architecture, "model_args": model_args, "pretrained_cfg": {}}
    return TIMM_PREFIX + str(cached_dir("timm", {"config.json": jsonio.dumps(config, indent=2).encode()}))


def timm_local_dir(name: str) -> Path | None:
    return Path(name[len(TIMM_PREFIX):]) if isinstance(name, str) and name.startswith(TIMM_PREFIX) else None
