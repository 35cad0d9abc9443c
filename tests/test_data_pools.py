"""Caption pools in the training batch (objective.it_positives: pool): each sample's pool_keys are the keys of
its own captions, the drawn one first, on real MedPix rows built with label captions and read by a worker."""

from __future__ import annotations

import json
import tarfile

import torch
from conftest import require_shared
from torchvision import transforms

from medclip.data.decode import caption_key, pool_keys
from medclip.data.manifest import load_manifest
from medclip.data.stream import build_train_stream
from medclip.losses import World
from medclip.losses.it_align import pool_positives
from medclip.training.prepare import BuildSpec, build_source

TRANSFORM = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])


def test_caption_keys_and_pool_order():
    assert caption_key(" CT image of the Head. ") == caption_key("CT image of the Head.")
    assert caption_key("CT image of the Head.") != caption_key("CT image of the head.")
    keys = [caption_key(c) for c in ("a", "b", "c")]
    assert pool_keys(["a", "b", "c"], 1) == (keys[1], keys[0], keys[2])
    assert pool_keys(["a"], 0) == (keys[0],)


def _real_shards(tmp_path, rows: int):
    medpix = require_shared("medpix")
    lines = (medpix / "dev.jsonl").read_text().splitlines()[:rows]
    table = tmp_path / "rows.jsonl"
    table.write_text("".join(json.dumps({**r, "image": str(medpix / r["image"])}) + "\n"
                             for r in map(json.loads, lines)))
    spec = BuildSpec(name="medpix-pools", input=str(table), max_side=48,
                     label_captions=["{modality} image of the {location_category}."])
    manifest_path = build_source(spec, tmp_path / "shards")
    metas = {}
    for url in load_manifest(manifest_path).urls:
        with tarfile.open(url) as tar:
            metas.update({m.name[:-len(".json")]: json.loads(tar.extractfile(m).read()) for m in tar.getmembers()
                          if m.name.endswith(".json")})
    return manifest_path, metas


def test_batches_carry_each_samples_pool_and_label_captions_are_shared(tmp_path, tiny_encoder):
    manifest_path, metas = _real_shards(tmp_path, rows=40)
    tokenizer = tiny_encoder.tokenizer
    stream = build_train_stream([manifest_path], tokenizer, TRANSFORM, batch_size=8, seed=3, num_workers=1)
    shared_pairs = 0
    for epoch in range(2):
        stream.set_epoch(epoch)
        for batch in stream:
            pools = batch["pool_keys"]
            assert pools.dtype == torch.int64 and pools.shape == (8, 2)
            drawn = []
            for key, ids, row in zip(batch["keys"], batch["text"], pools):
                captions = metas[key]["captions"]
                assert set(row.tolist()) == {caption_key(c) for c in captions}
                # the drawn caption is the one whose tokens the batch holds
                matches = [c for c in captions if torch.equal(tokenizer([c])[0], ids)]
                assert matches and row[0] == caption_key(matches[0])
                drawn.append(matches[0])
            image_to_text, _ = pool_positives(pools, World.single())
            for i, key in enumerate(batch["keys"]):
                for j, text in enumerate(drawn):
                    assert bool(image_to_text[i, j]) == (i == j or text in metas[key]["captions"])
                    shared_pairs += i != j and bool(image_to_text[i, j])
    # real rows repeat their labels: "CT image of the Head." names several images of a batch
    assert shared_pairs > 0
