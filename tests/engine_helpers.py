"""Synthetic training batches, injectable streams and hand-written shards for the tests (no data set needed)."""

from __future__ import annotations

import functools
import importlib.util
import io
import socket
import sys
import tarfile
from pathlib import Path

import torch

from medclip.data.concepts import concept_key
from medclip.models.loading import build_tokenizer, resolve_config
from medclip.training.config import load_recipe

CAPTIONS = ["pleural effusion in the left lung", "nodule in the right upper lobe", "brain mri without mass",
            "fracture of the left femur", "cardiomegaly on chest x-ray", "liver mass on ct",
            "right pleural effusion and nodule", "normal knee radiograph"]
CUIS = ["C0032227", "C0028259", "C0577559", "C0016658", "C0018800", "C0577559", "C0032227", None]


@functools.cache
def tokenizer(model: str = "medclip-tiny"):
    return build_tokenizer(resolve_config(model))


def make_batch(size: int = 8, seed: int = 0, image_size: int = 64, model: str = "medclip-tiny") -> dict:
    """A fixed batch in the training-batch contract (one concept per caption, token spans)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(CAPTIONS), generator=g).tolist() if seed else list(range(len(CAPTIONS)))
    picks = [order[i % len(order)] for i in range(size)]
    captions = [CAPTIONS[i] for i in picks]
    spans = torch.tensor([[[1, 3]] for _ in captions])
    ids = torch.tensor([[concept_key(CUIS[i] or "none")] for i in picks])
    mask = torch.tensor([[CUIS[i] is not None] for i in picks])
    return {"images": torch.randn(size, 3, image_size, image_size, generator=g), "text": tokenizer(model)(captions),
            "concept_spans": spans, "concept_ids": ids, "concept_mask": mask,
            "keys": [f"s{seed}k{i}" for i in range(size)]}


class FixedStream:
    """Yields the same rank-local batch forever; enough state for checkpoints. ``skip_counts`` reports
    how many batches were drawn, so a summary shows what the trainer fetched."""

    def __init__(self, batch: dict):
        self.batch, self.position = batch, 0

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]

    def skip_counts(self) -> dict:
        return {"batches_drawn": self.position}


class ShardedStream(FixedStream):
    """Global batch i of ``batches`` at step i, this rank's rows of it (rank r of w: rows r::w blocks)."""

    def __init__(self, batches: list[dict], rank: int = 0, world: int = 1):
        super().__init__(None)
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        while True:
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            size = len(batch["images"]) // self.world
            rows = slice(self.rank * size, (self.rank + 1) * size)
            yield {k: v[rows] for k, v in batch.items()}


def recipe(out, *overrides: str):
    return load_recipe(None, [f"run.output_dir={out}", "data.demo=true", "data.batch_size=8",
                              "run.progress=false", "run.tensorboard=false", "objective.pc_weight=0.5",
                              "optim.warmup_steps=1", *overrides])


def grads(module) -> dict:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shard(path, samples: dict[str, dict[str, bytes]]):
    """A tar shard with the members ``KEY.EXT`` of ``samples`` (key -> extension -> bytes), in that order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def load_bench(file: str):
    """A bench script of bench/ as a module (its sibling helpers importable, registered for its dataclasses)."""
    bench = Path(__file__).resolve().parents[1] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{Path(file).stem}", bench / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
