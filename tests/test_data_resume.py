"""Exact resume of the training stream with loader workers and several ranks.

Each rank is simulated by its own stream in this process (a rank's stream depends only on its rank,
the world size and the seed). For every checkpoint position, the stream resumed from the state taken
after that batch must give the batches the uninterrupted stream gave next: same sample keys, pixels
(random crops included), token ids and skip counts, across the epoch boundary.
"""

from __future__ import annotations

import io
import json
import tarfile
from itertools import islice
from pathlib import Path

import pytest
import torch
from open_clip.transform import PreprocessCfg, image_transform_v2

from medclip.data.demo import build_demo
from medclip.data.manifest import Manifest
from medclip.data.stream import build_train_stream
from medclip.training.components import batches_forever

AUGMENT = image_transform_v2(PreprocessCfg(size=32), is_train=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Manifest]:
    """Two demo sources (3 shards of 40; 40 + 20) and a third with a shard cut in the middle of a sample and
    one with broken samples, so that shard and sample skips are counted before and after each checkpoint."""
    out = tmp_path_factory.mktemp("resume")
    build_demo(out, n_train=120, n_val=60, image_size=32, shard_samples=40)
    val = sorted(str(p) for p in out.glob("demo-val-*.tar"))
    with tarfile.open(val[0]) as tar:
        cut = tar.getmembers()[20].offset_data + 100  # in the 7th sample's last member (.txt): 6 stay whole
    data = Path(val[0]).read_bytes()
    (out / "cut.tar").write_bytes(data[:cut])
    _write_broken_samples(val[1], out / "broken.tar")
    return [Manifest("train", sorted(str(p) for p in out.glob("demo-train-*.tar")), weight=1.0),
            Manifest("val", val, weight=1.0),
            Manifest("bad", [str(out / "cut.tar"), str(out / "broken.tar")], weight=1.0)]


def _write_broken_samples(source: str, path: Path) -> None:
    """Copy the first 12 samples of ``source`` with 2 corrupt images and 2 bad JSONs (counted skips)."""
    with tarfile.open(source) as src, tarfile.open(path, "w") as dst:
        for i, member in enumerate(src.getmembers()[:36]):
            data = src.extractfile(member).read()
            sample, ext = divmod(i, 3)[0], member.name.rsplit(".", 1)[1]
            if sample in (2, 7) and ext == "jpg":
                data = b"\xff\xd8 not an image"
            if sample in (4, 9) and ext == "json":
                data = b"{broken"
            member.size = len(data)
            dst.addfile(member, io.BytesIO(data))


def _stream(sources, tokenizer, rank: int, workers: int, batch_size: int):
    # The trainer's settings: drop_last, a shuffle buffer, open_clip's random training crop.
    return build_train_stream(sources, tokenizer, AUGMENT, batch_size=batch_size, seed=3, rank=rank, world_size=2,
                              num_workers=workers, shuffle_buffer=30, drop_last=True)


def _record(stream, n: int, states: bool, epochs: int | None = None, extra: int = 0) -> list[dict]:
    """The next n batches as the trainer takes them (epoch after epoch), each with the state after it;
    with ``epochs``, stop ``extra`` batches into epoch number ``epochs``."""
    out = []
    for batch in islice(batches_forever(stream), n):
        out.append({"keys": batch["keys"], "images": batch["images"].clone(), "text": batch["text"].clone(),
                    "skips": stream.skip_counts(), "epoch": stream.epoch,
                    "state": json.loads(json.dumps(stream.state_dict())) if states else None})
        if epochs is not None and sum(r["epoch"] == epochs for r in out) == extra:
            break
    return out


def _same(a: dict, b: dict) -> bool:
    return (a["keys"] == b["keys"] and torch.equal(a["images"], b["images"]) and torch.equal(a["text"], b["text"])
            and a["skips"] == b["skips"])


def _check_resumes(sources, tokenizer, workers: int, batch_size: int, positions) -> dict:
    """Resume each rank after the batches ``positions(rank, batches in its first epoch)`` picks.

    A resume inside the first epoch is compared up to that epoch's end; one after the epoch's last
    batch (the boundary) or the one before it is compared into the second epoch.
    """
    figures = {"resumes": 0, "batches_compared": 0, "boundary_resumes": 0, "truncated_tar": 0}
    for rank in range(2):
        full = _record(_stream(sources, tokenizer, rank, workers, batch_size), 1000, states=True, epochs=1, extra=2)
        epoch0 = sum(r["state"]["epoch"] == 0 for r in full)  # batches of this rank's first epoch
        boundary = epoch0 - 1
        assert full[boundary]["state"]["epoch"] == 0 and full[boundary + 1]["epoch"] == 1
        figures["truncated_tar"] += full[boundary + 1]["state"]["skips_before"].get("truncated_tar", 0)  # epoch 0
        for i in sorted(set(positions(rank, epoch0))):
            resumed = _stream(sources, tokenizer, rank, workers, batch_size)
            resumed.load_state_dict(full[i]["state"])
            end = len(full) if i >= boundary - 1 else epoch0
            rest = _record(resumed, end - 1 - i, states=False)
            for j, (got, want) in enumerate(zip(rest, full[i + 1:end], strict=True)):
                assert _same(got, want), f"rank {rank}, resumed after batch {i}: batch {i + 1 + j} differs"
            figures["resumes"] += 1
            figures["batches_compared"] += len(rest)
            figures["boundary_resumes"] += i == boundary
    return figures


def test_resume_is_exact_at_every_batch_with_2_ranks_x_2_workers(sources, tiny_encoder):
    # rank 0 after every batch of its epoch, rank 1 after every other one
    figures = _check_resumes(sources, tiny_encoder.tokenizer, workers=2, batch_size=8,
                             positions=lambda rank, n: {*range(rank, n, 1 + rank), n - 1})
    print(figures)
    assert figures["boundary_resumes"] == 2 and figures["resumes"] >= 15
    assert figures["truncated_tar"] == 1  # the cut shard is read by one slot of one rank per epoch


@pytest.mark.integration
def test_resume_is_exact_with_8_workers_per_rank(sources, tiny_encoder):
    # 16 slots for 6 shards: slots share shards; workers end after different numbers of batches.
    figures = _check_resumes(sources, tiny_encoder.tokenizer, workers=8, batch_size=4,
                             positions=lambda rank, n: [n - 1] if rank == 0 else [n // 2])
    print(figures)
    assert figures["boundary_resumes"] == 1 and figures["truncated_tar"] == 1


def test_skip_counts_after_a_resume_are_those_of_the_uninterrupted_run(sources, tiny_encoder):
    def make():
        return build_train_stream(sources, tiny_encoder.tokenizer, AUGMENT, batch_size=8, seed=3, num_workers=2,
                                  shuffle_buffer=30, drop_last=True)

    whole = make()
    list(whole)
    expected = {"bad_json": 2, "corrupt_image": 2, "truncated_tar": 1}
    assert whole.skip_counts() == expected
    # checkpoints right after the cut shard was counted, and right after the first broken sample was
    for kind in ("truncated_tar", "corrupt_image"):
        interrupted = make()
        for _ in interrupted:
            if kind in interrupted.skip_counts():
                state = json.loads(json.dumps(interrupted.state_dict()))
                break
        resumed = make()
        resumed.load_state_dict(state)
        list(resumed)  # replays the shards up to the checkpoint without decoding or counting them again
        assert resumed.skip_counts() == expected, kind
