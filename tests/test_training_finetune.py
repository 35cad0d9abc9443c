"""Fine-tuning recipes by name (issue 25): `medclip pretrain --config finetune_{full,lit,lora}` start from a
trained model, train what their mode says, and the LoRA export merges the adapters so plain open_clip loads
it. Bad input (targets, rank, start weights) stops with one line. Through the command line, loader workers > 0."""

from __future__ import annotations

import json
import warnings

import open_clip
import pytest
import torch
from conftest import one_error_line

import medclip
from medclip.cli import main
from medclip.training.checkpoint import list_checkpoints
from medclip.training.config import LoraConfig
from medclip.training.lora import add_adapters

TEXTS = ["a chest x-ray with pleural effusion", "an axial CT slice of the abdomen"]
# The shipped fine-tuning recipes at test scale: a medclip-tiny export as the start, the demo set as data.
SMALL = ["--set", "model.name=medclip-tiny", "--set", "data.build=[]", "--set", "data.demo=true",
         "--set", "data.demo_train_samples=96", "--set", "data.demo_val_samples=16", "--set", "data.batch_size=16",
         "--set", "data.num_workers=2", "--set", "eval.suites=[]", "--set", "run.steps=4", "--set",
         "run.checkpoint_every=2", "--set", "optim.warmup_steps=1", "--set", "run.log_every=1",
         "--set", "run.progress=false", "--set", "run.tensorboard=false"]


@pytest.fixture(scope="module")
def start_export(tmp_path_factory):
    """A medclip export to fine-tune from (random weights stand in for a trained medclip-tiny)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", medclip.RandomWeightsWarning)
        encoder = medclip.load("medclip-tiny", device="cpu")
    return medclip.save(encoder, tmp_path_factory.mktemp("start") / "export")


def finetune(recipe: str, start, out, *extra: str) -> list[str]:
    return ["pretrain", "--config", recipe, *SMALL, "--set", f"model.checkpoint={start}",
            "--set", f"run.output_dir={out}", *extra]


def final_weights(out) -> dict:
    return torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)["model"]


def changed(before: dict, after: dict, prefix: str) -> bool:
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return any(not torch.equal(before[k], after[k]) for k in keys)


@pytest.mark.parametrize("recipe, image_trains", [("finetune_full", True), ("finetune_lit", False)])
def test_full_and_lit_recipes_start_from_the_export_and_train_what_they_say(recipe, image_trains, start_export,
                                                                            tmp_path, capsys):
    out = tmp_path / recipe
    assert main(finetune(recipe, start_export, out, "--set", "run.checkpoint_every=1")) == 0
    start = medclip.load(start_export, device="cpu").model.state_dict()
    first = torch.load(list_checkpoints(out)[0], map_location="cpu", weights_only=True)["model"]
    # one step from the start weights, not from a fresh initialisation: the text embedding moved a little
    assert (first["token_embedding.weight"] - start["token_embedding.weight"]).abs().max() < 0.05
    final = final_weights(out)
    assert changed(start, final, "visual.") == image_trains
    assert changed(start, final, "transformer.")
    summary = (out / "summary.txt").read_text()
    assert "trainable parameters: " in summary and "peak memory: " in summary


def test_lit_with_last_n_layers_unlocked_trains_only_those_image_layers(start_export, tmp_path):
    out = tmp_path / "lastn"
    assert main(finetune("finetune_lit", start_export, out, "--set", "model.unlocked_image_layers=1")) == 0
    start, final = medclip.load(start_export, device="cpu").model.state_dict(), final_weights(out)
    assert changed(start, final, "visual.ln_post") or changed(start, final, "visual.proj")  # the last group
    assert not changed(start, final, "visual.conv1")


def test_lora_recipe_trains_adapters_only_and_its_export_loads_in_plain_open_clip(start_export, tmp_path, capsys):
    out = tmp_path / "lora"
    assert main(finetune("finetune_lora", start_export, out)) == 0
    printed = capsys.readouterr().out
    start = medclip.load(start_export, device="cpu")
    trained = final_weights(out)  # the checkpoint keeps the adapters unmerged (resume continues them)
    assert any(".lora_A." in k for k in trained) and any(".lora_B." in k for k in trained)
    for key, value in trained.items():
        if ".base_layer." in key:  # the adapted layers' own weights stayed the start's
            assert torch.equal(value, start.model.state_dict()[key.replace(".base_layer", "")]), key
    # The summary states what trained and the peak memory (CPU: the process's peak RSS).
    trainable, total = (int(n.replace(",", "")) for n in
                        printed.split("trainable parameters: ")[1].split(" (")[0].split(" of "))
    assert 0 < trainable < 0.05 * total
    assert "peak memory: " in printed and "peak RSS" in printed

    # The adapted model as training ran it: the architecture with the recipe's adapters, the checkpoint's weights.
    adapted = medclip.load(start_export, device="cpu")
    add_adapters(adapted.model, LoraConfig(rank=8, alpha=16, dropout=0.05))
    adapted.model.load_state_dict(trained)
    pixels = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        adapted.model.eval()  # the adapters' dropout layers are new, in training mode
        want_image, want_text = adapted.encode_image(pixels), adapted.encode_text(TEXTS)
        start_image = start.encode_image(pixels)
    assert (want_image - start_image).abs().max() > 1e-4  # the adapters moved the embeddings
    # Plain open_clip, strict keys (its load_checkpoint's default): the merged export, equal embeddings.
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out / 'export'}")
    with torch.no_grad():
        got_image = model.eval().encode_image(pixels)
        got_text = model.encode_text(tokenizer(TEXTS))
    torch.testing.assert_close(torch.nn.functional.normalize(got_image, dim=-1), want_image, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.nn.functional.normalize(got_text, dim=-1), want_text, atol=1e-5, rtol=0)
    # medclip.load of the training checkpoint merges its adapters as the export does
    from_checkpoint = medclip.load(list_checkpoints(out)[-1], device="cpu")
    torch.testing.assert_close(from_checkpoint.encode_image(pixels), want_image, atol=1e-5, rtol=0)
    # and a fine-tuning run starts from it (its adapters merged into the start weights)
    assert main(finetune("finetune_full", list_checkpoints(out)[-1], tmp_path / "again", "--set", "run.steps=1")) == 0


def test_a_lora_checkpoint_from_another_machine_starts_a_run_with_the_recipes_hf_text_dir(tmp_path, capsys):
    """A LoRA training checkpoint names its HF text tower's files where it was trained; moved to another machine,
    model.hf_text_dir says where they are now (as medclip.load's hf_text_dir does), for the adapters' merge too."""
    import shutil

    from medclip.models.registry import ASSETS_DIR

    trained_with, here = tmp_path / "gone" / "tiny-bert", tmp_path / "here" / "tiny-bert"
    for folder in (trained_with, here):
        shutil.copytree(ASSETS_DIR / "tiny-bert", folder)
    bert = ["--set", "model.name=medclip-tiny-bert"]
    assert main(["pretrain", "--config", "demo", *SMALL, *bert, "--set", f"model.hf_text_dir={trained_with}",
                 "--set", "model.lora.rank=4", "--set", "run.steps=1", "--set", f"run.output_dir={tmp_path / 'a'}"]) == 0
    shutil.rmtree(trained_with)
    checkpoint = list_checkpoints(tmp_path / "a")[-1]
    assert main(finetune("finetune_full", checkpoint, tmp_path / "b", *bert, "--set", f"model.hf_text_dir={here}",
                         "--set", "run.steps=1", "--set", "optim.lr=1e-30")) == 0
    want = medclip.load(checkpoint, device="cpu", hf_text_dir=here).model.state_dict()  # adapters merged
    start = final_weights(tmp_path / "b")  # lr 1e-30: the weights the run started from (zeros move by 1e-30)
    assert start.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(start[key], value, atol=1e-20, rtol=0)


def refused(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return one_error_line(capsys.readouterr().err)


def test_bad_fine_tuning_input_stops_with_one_line(start_export, tmp_path, capsys):
    out = tmp_path / "bad"
    line = refused(capsys, finetune("finetune_lora", start_export, out, "--set", "model.lora.targets=[visual.nope.*]"))
    assert "model.lora.targets: 'visual.nope.*' matches no linear or convolution layer" in line
    assert "visual.transformer.resblocks.0.attn.out_proj" in line  # names layers that exist
    line = refused(capsys, finetune("finetune_lora", start_export, out, "--set", "model.lora.rank=1000"))
    assert "model.lora.rank 1000 is larger than layer" in line and "choose a rank of at most" in line
    line = refused(capsys, finetune("finetune_lora", start_export, out, "--set", "model.checkpoint="))
    assert line == ("medclip: error: this recipe fine-tunes a trained model: set model.checkpoint (--set "
                    "model.checkpoint=DIR with a medclip export, a weights file, a zoo model's name, or NAME=PATH for "
                    "its local snapshot)")
    line = refused(capsys, finetune("finetune_full", tmp_path / "no-such-export", out))
    assert f"model.checkpoint {tmp_path / 'no-such-export'} does not exist" in line
    # weights of another model than the recipe's model.name
    line = refused(capsys, finetune("finetune_full", start_export, out, "--set", "model.name=medclip-small"))
    assert line.startswith("medclip: error: model.checkpoint for model.name medclip-small: checkpoint from ")
    assert "does not fit the architecture" in line


def test_resuming_a_lora_run_with_other_adapter_settings_stops_with_one_line(start_export, tmp_path, capsys):
    """Another alpha fits the checkpoint's tensors but scales the adapters' update differently: resuming would
    continue another model than the one trained (silently, before). Another rank or targets: the line names
    the LoRA setting, not the model."""
    out = tmp_path / "lora"
    assert main(finetune("finetune_lora", start_export, out, "--set", "run.steps=2")) == 0
    checkpoint = list_checkpoints(out)[-1]
    for item, was in (("alpha=64", "16.0"), ("rank=4", "8"), ("targets=[visual.transformer.resblocks.0.mlp.c_fc]",
                                                               "[]")):
        key = item.split("=")[0]
        line = refused(capsys, finetune("finetune_lora", start_export, out, "--set", "run.steps=3", "--set",
                                        f"model.lora.{item}", "--resume", "latest"))
        assert line.startswith(f"medclip: error: --resume: {checkpoint} was trained with "
                               f"model.lora.{key} {was}, this recipe has "), line
        assert f"--set model.lora.{key}={was}" in line
    assert list_checkpoints(out)[-1] == checkpoint  # nothing trained
    # dropout changes no weight: the run resumes
    assert main(finetune("finetune_lora", start_export, out, "--set", "run.steps=3", "--set", "model.lora.dropout=0",
                         "--resume", "latest")) == 0


@pytest.mark.parametrize("item, message", [
    ("model.lora.rank=-1", "recipe key model.lora.rank must not be negative, got -1"),
    ("model.lora.dropout=1", "recipe key model.lora.dropout must be in [0, 1), got 1.0"),
    ("model.lora.alpha=-4", "recipe key model.lora.alpha must not be negative, got -4.0"),
    ("model.lora.alpha=0", "recipe key model.lora.alpha must be positive with model.lora.rank 8 (the adapters' "
                           "update is scaled by alpha / rank: 0 trains nothing), got 0.0"),
    ("model.freeze_text=true", "recipe key model.freeze_text does not combine with model.lora (only the adapters "
                               "train, in both towers by default): leave it unset and choose the adapted layers with "
                               "model.lora.targets, e.g. [visual\\..*] for the image tower alone"),
    ("model.unlocked_image_layers=-1", "recipe key model.unlocked_image_layers must not be negative, got -1"),
    ("model.lora.ranks=4", "unknown recipe key model.lora.ranks (valid keys here: alpha, dropout, rank, targets)"),
])
def test_fine_tuning_settings_out_of_range_are_one_line(item, message):
    from medclip.errors import MedclipError
    from medclip.training.config import load_recipe

    with pytest.raises(MedclipError) as err:
        load_recipe("finetune_lora", [item])
    assert str(err.value) == message


def test_lora_targets_without_a_rank_are_one_line():
    """Targets with rank 0 would fine-tune without adapters (every weight of finetune_full), silently."""
    from medclip.errors import MedclipError
    from medclip.training.config import load_recipe

    with pytest.raises(MedclipError) as err:
        load_recipe("finetune_full", ["model.lora.targets=[visual.*]"])
    assert str(err.value) == ("recipe key model.lora.targets needs model.lora.rank > 0 (rank 0: no adapters), got "
                              "['visual.*']")


def _walkthrough_commands() -> list[list[str]]:
    """The README's fine-tuning walkthrough, command by command, as argv after `medclip`."""
    import shlex

    from conftest import REPO_ROOT
    from test_packaging import _fenced_shell_lines

    readme = (REPO_ROOT / "README.md").read_text()
    section = readme.split("## Fine-tune on your own images", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line)[1:] for line in _fenced_shell_lines(section) if line.startswith("medclip ")]


def _covid_subset(folder, split: str, pick) -> None:
    """``folder/SPLIT.csv`` (path, caption, finding) and its images, from the real COVID-19 X-ray split."""
    import csv
    import json
    import shutil

    from conftest import require_shared

    source = require_shared("covid-cxr", f"{split}.jsonl")
    rows = pick([json.loads(line) for line in source.read_text().splitlines()])
    (folder / "images").mkdir(exist_ok=True)
    with open(folder / f"{split}.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "caption", "finding"])
        for r in rows:
            shutil.copy(source.parent / r["image"], folder / r["image"])
            writer.writerow([r["image"], r["caption"], r["finding"]])


@pytest.mark.integration
def test_readme_walkthrough_runs_as_written_on_real_covid_images(tmp_path, monkeypatch, capsys):
    """Images + CSV tables -> shards -> leakage check -> finetune_lora -> zero-shot on the user's labels: the
    README's commands as written (the fine-tuning run at test scale: 2 steps), on a real COVID-19 subset."""
    commands = _walkthrough_commands()
    assert [c[:2] for c in commands] == [["shards", "build"], ["data", "leakage"], ["pretrain", "--config"],
                                         ["eval", "zero-shot"]]
    monkeypatch.chdir(tmp_path)
    _covid_subset(tmp_path, "train", lambda rows: [r for r in rows if r["caption"]][:48])
    _covid_subset(tmp_path, "test", lambda rows: [r for r in rows if r["finding"] == "COVID-19"][:16]
                  + [r for r in rows if r["finding"] == "Pneumonia"])  # the test split has 4
    n_test = len((tmp_path / "test.csv").read_text().splitlines()) - 1
    with warnings.catch_warnings():  # the trained start the walkthrough names, stood in by random weights
        warnings.simplefilter("ignore", medclip.RandomWeightsWarning)
        medclip.save(medclip.load("medclip-small-resnet18", device="cpu"), tmp_path / "runs/shared_real/export")
    build, leakage, train, evaluate = commands
    assert main(build) == 0 and (tmp_path / "shards/mine.yaml").is_file()
    assert main([*leakage, "--no-progress"]) == 0
    assert f"no leakage found: 48 training images against {n_test} evaluation images" in capsys.readouterr().out
    assert main([*train, "--set", "run.steps=2", "--set", "data.batch_size=8", "--set", "data.num_workers=2",
                 "--set", "run.progress=false", "--set", "run.tensorboard=false"]) == 0
    assert "trainable parameters: " in (tmp_path / "runs/mine/summary.txt").read_text()
    assert main([*evaluate, "--out", "results"]) == 0
    record = json.loads(next((tmp_path / "results").glob("*/test.json")).read_text())
    assert record["n_samples"] == n_test and record["n_skipped"] == 0 and 0 <= record["headline"] <= 1


def test_lora_with_an_ema_exports_the_ema_of_the_adapters_merged(start_export, tmp_path):
    """EMA and LoRA together: the export is the EMA of the adapters, merged into plain weights (the EMA is
    swapped in before the merge; merged from the raw adapters the embeddings differ)."""
    out = tmp_path / "lora-ema"
    assert main(finetune("finetune_lora", start_export, out, "--set", "optim.ema_decay=0.5",
                         "--set", "optim.ema_export=true", "--set", "optim.ema_warmup=false")) == 0
    final = torch.load(list_checkpoints(out)[-1], map_location="cpu", weights_only=True)
    raw, ema = final["model"], final["ema"]["weights"]
    averaged = {key: ema.get(f"model.{key}", value) for key, value in raw.items()}
    assert any(not torch.equal(averaged[k], raw[k]) for k in raw if ".lora_" in k)
    pixels = torch.rand(2, 3, 64, 64)
    exported = medclip.load(out / "export", device="cpu")
    for weights, equal in ((averaged, True), (raw, False)):
        adapted = medclip.load(start_export, device="cpu")
        add_adapters(adapted.model, LoraConfig(rank=8, alpha=16, dropout=0.05))
        adapted.model.load_state_dict(weights)
        adapted.model.eval()
        with torch.no_grad():
            close = torch.allclose(exported.encode_image(pixels), adapted.encode_image(pixels), atol=1e-5, rtol=0)
        assert close == equal
