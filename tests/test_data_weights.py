"""Source weights in training: shares of an epoch over 2 ranks x 2 workers, and exactly-once without weights."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from torchvision import transforms

from medclip.data.demo import build_demo
from medclip.data.manifest import Manifest, load_manifest
from medclip.data.mixing import plan_mix
from medclip.data.stream import build_train_stream
from medclip.errors import MedclipError
from medclip.models.loading import build_model, resolve_config
from medclip.training.components import build_data
from medclip.training.config import load_recipe
from medclip.training.distributed import DistEnv

TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("weights")
    build_demo(out, n_train=240, n_val=60, image_size=32, shard_samples=40)  # 6 shards of 40; 40 + 20
    return out


def _all_keys(demo: Path, prefix: str) -> set[str]:
    return {k for p in demo.glob(f"{prefix}-*.tar") for k in _tar_keys(p)}


def _tar_keys(path: Path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {m.name.split(".")[0] for m in tar.getmembers()}


def _epoch_keys(streams) -> Counter:
    """Sample keys of one epoch of every rank's stream (each rank iterates its own, with its workers)."""
    return Counter(k for stream in streams for batch in stream for k in batch["keys"])


def test_recipe_weights_set_the_source_shares_over_2_ranks_x_2_workers(demo, tmp_path):
    # The training path: recipe sources with weights and data.epoch_samples, built by build_data for each rank.
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": {"name": "medclip-tiny"},
        "data": {"sources": [{"manifest": str(demo / "demo-train.yaml"), "weight": 0.75},
                             {"manifest": str(demo / "demo-val.yaml"), "weight": 2.5}],
                 "epoch_samples": 1000, "batch_size": 8, "num_workers": 2, "shuffle_buffer": 50},
        "run": {"output_dir": str(tmp_path / "run")}}))
    recipe = load_recipe(recipe_path)
    cfg = resolve_config("medclip-tiny")
    model = build_model(cfg, "cpu", "fp32")
    streams = [build_data(recipe, model, cfg, DistEnv(rank, 2, 0, "test"), tmp_path) for rank in range(2)]
    assert all(s.cfg.epoch_samples == 1000 and s.cfg.drop_last for s in streams)
    keys = _epoch_keys(streams)
    total = sum(keys.values())
    # 240 x 0.75 = 180 train and 60 x 2.5 = 150 val samples per unscaled epoch: 54.5 % / 45.5 %, scaled to 1000.
    intended_train = 180 / 330
    measured_train = sum(n for k, n in keys.items() if k.startswith("demo-train")) / total
    print(f"samples {total}; train share measured {measured_train:.4f}, intended {intended_train:.4f}")
    assert abs(measured_train - intended_train) <= 0.02
    # each worker drops its last partial batch (< 8 samples): 4 workers, and one sample of rounding per source
    assert 1000 - 4 * 7 - 8 <= total <= 1000 + 8
    # val samples are visited 1000 / 330 * 2.5 = 7.6 times each, train samples 2.3 times: reshuffled passes
    val_visits = [n for k, n in keys.items() if k.startswith("demo-val")]
    assert len(val_visits) == 60 and min(val_visits) >= 5 and max(val_visits) <= 9


def test_every_sample_exactly_once_per_epoch_without_weights(demo, tiny_encoder):
    manifests = [load_manifest(demo / "demo-train.yaml"), load_manifest(demo / "demo-val.yaml")]
    assert all(m.weight == 1.0 for m in manifests)
    expected = _all_keys(demo, "demo-train") | _all_keys(demo, "demo-val")

    def streams(drop_last: bool):
        return [build_train_stream(manifests, tiny_encoder.tokenizer, TRANSFORM, batch_size=8, seed=1, rank=rank,
                                   world_size=2, num_workers=2, shuffle_buffer=50, drop_last=drop_last)
                for rank in range(2)]

    keys = _epoch_keys(streams(drop_last=False))
    print(f"{len(expected)} samples in the shards; seen {sum(keys.values())} times, {len(keys)} distinct")
    assert set(keys) == expected and set(keys.values()) == {1}
    # The trainer's drop_last: still never twice; each of the 4 workers leaves out at most 7 samples.
    keys = _epoch_keys(streams(drop_last=True))
    assert set(keys.values()) == {1} and set(keys) <= expected and len(expected) - len(keys) <= 4 * 7


def test_weights_without_epoch_samples_are_visits_per_sample(demo, tiny_encoder):
    # weight 0.5: a random half of the samples, another half next epoch; weight 2: every sample twice.
    a = Manifest("a", sorted(str(p) for p in demo.glob("demo-train-*.tar")), weight=0.5)
    b = Manifest("b", sorted(str(p) for p in demo.glob("demo-val-*.tar")), weight=2.0)
    stream = build_train_stream([a, b], tiny_encoder.tokenizer, TRANSFORM, batch_size=16, num_workers=2,
                                shuffle_buffer=50)
    first, second = Counter(), Counter()
    for counter in (first, second):
        counter.update(k for batch in stream for k in batch["keys"])
    for epoch in (first, second):
        train = {k: n for k, n in epoch.items() if k.startswith("demo-train")}
        assert abs(len(train) - 120) <= 2 and set(train.values()) == {1}  # 2 workers: 1 rounding each
        assert [n for k, n in epoch.items() if k.startswith("demo-val")] == [2] * 60
    train_first = {k for k in first if k.startswith("demo-train")}
    train_second = {k for k in second if k.startswith("demo-train")}
    assert 30 < len(train_first & train_second) < 90  # independent halves overlap by about a quarter


def test_mix_plan_shares_and_missing_counts():
    a, b = Manifest("a", ["a.tar"], samples=300, weight=1.0), Manifest("b", ["b.tar"], samples=100, weight=3.0)
    plan = plan_mix([a, b, Manifest("off", ["c.tar"], samples=5, weight=0.0)], epoch_samples=1200)
    assert plan.visits == {0: 2.0, 1: 6.0} and plan.shares() == {0: 0.5, 1: 0.5}
    with pytest.raises(MedclipError, match="'remote' has no sample count"):
        plan_mix([a, Manifest("remote", ["s3://bucket/x.tar"])], epoch_samples=10)
    with pytest.raises(MedclipError, match="weight 0"):
        plan_mix([Manifest("off", ["c.tar"], weight=0.0)], None)
