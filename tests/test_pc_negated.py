"""PC-Align with negated mentions as negatives (objective.pc_negated 'negative'): "no hemorrhage" in an
image's own caption makes hemorrhage a negative of that image, and normal studies get scored."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from medclip.errors import MedclipError
from medclip.losses import PCAlignConfig, World, pc_align_loss

SINGLE = World.single()


def _batch(dtype=torch.float64):
    g = torch.Generator().manual_seed(5)
    patches = torch.randn(3, 4, 6, generator=g, dtype=dtype)
    concepts = torch.randn(3, 2, 6, generator=g, dtype=dtype)
    ids = torch.tensor([[7, 8], [7, 9], [8, 0]])
    mask = torch.tensor([[True, True], [False, True], [False, False]])  # image 2: a normal study
    negated = torch.tensor([[False, False], [True, False], [True, False]])  # 1: "no 7"; 2: "no 8"
    return patches, concepts, mask, ids, negated, torch.tensor(1.3, dtype=dtype), torch.tensor(-0.5, dtype=dtype)


def test_negated_concepts_are_negatives_of_their_own_image_by_hand():
    patches, concepts, mask, ids, negated, scale, bias = _batch()
    cfg = PCAlignConfig("max", negated="negative")
    loss = pc_align_loss(patches, concepts, mask, ids, scale.log(), bias, cfg, world=SINGLE, concept_negated=negated)
    pn, cn = F.normalize(patches, dim=-1), F.normalize(concepts, dim=-1)
    present = [(0, 0), (0, 1), (1, 1)]  # (image, slot) of the batch's concepts that are there: ids 7, 8, 9
    total = 0.0
    for i in range(3):
        own = {int(ids[i, k]) for k in range(2) if mask[i, k]}
        absent = {int(ids[i, k]) for k in range(2) if negated[i, k]}
        for j, k in present:
            score = (scale * pn[i] @ cn[j, k] + bias).max()
            if i == j:
                total += -F.logsigmoid(score)
            elif own and int(ids[j, k]) not in own:  # as before: another caption's concept
                total += -F.logsigmoid(-score)
            elif not own and int(ids[j, k]) in absent:  # the normal study: only what it says is absent
                total += -F.logsigmoid(-score)
    assert torch.allclose(loss, total / 3, atol=1e-10)  # all three images are scored now
    ignored = pc_align_loss(patches, concepts, mask, ids, scale.log(), bias, PCAlignConfig("max"), world=SINGLE,
                            concept_negated=negated)
    assert not torch.allclose(loss, ignored)  # 'ignore' (the default) scores two images, as before


def test_negated_gradcheck_and_errors():
    patches, concepts, mask, ids, negated, scale, bias = _batch()
    cfg = PCAlignConfig("max", chunk_size=2, negated="negative")
    inputs = tuple(t.clone().requires_grad_() for t in (patches, concepts, scale, bias))
    assert torch.autograd.gradcheck(
        lambda pt, ct, s, b: pc_align_loss(pt, ct, mask, ids, s, b, cfg, world=SINGLE, concept_negated=negated),
        inputs, eps=1e-6, atol=1e-5)
    with pytest.raises(MedclipError, match="needs concept_negated"):
        pc_align_loss(patches, concepts, mask, ids, scale, bias, cfg, world=SINGLE)
    with pytest.raises(MedclipError, match="negated must be one of"):
        PCAlignConfig(negated="positive")
    from medclip.losses.objective import ObjectiveConfig

    assert ObjectiveConfig.from_dict({"pc_negated": "negative"}).pc_config().negated == "negative"


@pytest.mark.integration  # builds a demo set and reads it with a loader worker
def test_the_training_stream_marks_negated_mentions(tmp_path, tiny_encoder):
    from torchvision import transforms

    from medclip.data.manifest import load_manifest
    from medclip.data.stream import build_train_stream

    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "medclip", "data", "demo", "--out", str(out), "--n-train", "48",
                           "--n-val", "4", "--image-size", "32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(out / "demo-train.yaml", out)
    transform = transforms.Compose([transforms.Resize((32, 32)), transforms.ToTensor()])
    batches = list(build_train_stream([manifest], tiny_encoder.tokenizer, transform, batch_size=8, num_workers=1))
    normal = anything_negated = 0
    for b in batches:
        negated, mask, spans = b["concept_negated"], b["concept_mask"], b["concept_spans"]
        assert negated.dtype == torch.bool and negated.shape == mask.shape
        assert not (negated & mask).any()
        # Every slot with a span is either there or said absent; padding is neither.
        assert torch.equal(negated | mask, spans[..., 1] > spans[..., 0])
        normal += int((~mask.any(dim=1) & negated.any(dim=1)).sum())
        anything_negated += int(negated.any())
    assert normal > 0 and anything_negated > 0  # the demo's normal studies say "no <finding>"
