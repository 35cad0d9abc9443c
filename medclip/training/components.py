"""Glue between the engine and the library: the trained module, batch splitting, data, eval, export."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from types import SimpleNamespace

import torch
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2
from torch import nn

from medclip.errors import MedclipError
from medclip.losses import Features, Objective, ObjectiveConfig, clamp_logit_scales_, concat_features
from medclip.models.loading import build_preprocess_cfg, build_tokenizer

log = logging.getLogger(__name__)

CONCEPT_NAME_TOKENS = 16  # concept names are short; 16 tokens hold all the demo and MeSH names


class TrainModule(nn.Module):
    """The open_clip model plus PC-Align heads; forward = both towers once (what DDP/FSDP wrap)."""

    def __init__(self, model: nn.Module, heads: nn.Module | None, objective: ObjectiveConfig,
                 name_pad_id: int | None = None):
        super().__init__()
        self.model = model
        self.heads = heads
        self.objective = Objective(objective, name_pad_id=name_pad_id)

    def forward(self, batch: dict, step: int) -> dict:
        features = self.objective.forward_features(self.model, self.heads, batch, step)
        # A plain dict of tensors: DDP and FSDP look for tensors in the outputs they return.
        out = {f.name: getattr(features, f.name) for f in dataclasses.fields(features)}
        # The loss's scale/bias parameters leave forward as outputs too, as open_clip's CLIP.forward returns
        # logit_scale: DDP with find_unused_parameters counts as used only what forward's outputs reach.
        for owner, module in (("model", self.model), ("heads", self.heads)):
            for name in SCALE_PARAMS:
                if getattr(module, name, None) is not None:
                    out[f"{owner}.{name}"] = getattr(module, name).view_as(getattr(module, name))
        return out

    def losses(self, features: dict, step: int, live_scales: bool = True) -> dict:
        model, heads = self.model, self.heads
        scales = {k: features[f"{owner}.{k}"] for owner in ("model", "heads") for k in SCALE_PARAMS
                  if f"{owner}.{k}" in features}
        if scales or not live_scales:  # not live: this micro-batch must not add to the scale/bias gradients again
            model, heads = self._scale_views(features, live_scales)
        return self.objective.losses(Features(**_feature_fields(features)), step, model, heads)

    def _scale_views(self, features: dict, live: bool):
        """Stand-ins for model and heads holding the scale/bias tensors the loss should use."""
        def pick(owner: str, module, name: str):
            value = features.get(f"{owner}.{name}", getattr(module, name, None))
            return value if value is None or live else value.detach()

        model = SimpleNamespace(logit_scale=pick("model", self.model, "logit_scale"),
                                logit_bias=pick("model", self.model, "logit_bias"))
        heads = None
        if self.heads is not None:
            heads = SimpleNamespace(logit_scale=pick("heads", self.heads, "logit_scale"),
                                    logit_bias=pick("heads", self.heads, "logit_bias"), config=self.heads.config)
        return model, heads

    @staticmethod
    def merge_features(cached: list[dict], live_index: int, live: dict) -> dict:
        """The whole batch's features, part ``live_index`` live; the scales are the live forward's."""
        parts = [Features(**_feature_fields(live if i == live_index else c)) for i, c in enumerate(cached)]
        merged = concat_features(parts)
        scales = {k: v for k, v in live.items() if k not in _feature_fields(live)}
        return {**{f.name: getattr(merged, f.name) for f in dataclasses.fields(merged)}, **scales}

    def clamp_scales(self, max_log_scale: float) -> None:
        clamp_logit_scales_(self.model, self.heads, max_log_scale=max_log_scale)


SCALE_PARAMS = ("logit_scale", "logit_bias")


def _feature_fields(features: dict) -> dict:
    names = {f.name for f in dataclasses.fields(Features)}
    return {k: v for k, v in features.items() if k in names}


class RandomState:
    """The RNG state a forward draws its dropout masks from (CPU, and the CUDA device in use)."""

    def __init__(self, device: torch.device):
        self.devices = [device] if device.type == "cuda" else []
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]

    @contextlib.contextmanager
    def replayed(self):
        """Draw again what was drawn from this state; the RNG continues afterwards as if nothing was drawn."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for device, state in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(state, device)
            yield


def split_batch(batch: dict, parts: int) -> list[dict]:
    """k equal micro-batches along the batch dimension (lists such as `keys` are split alike)."""
    if parts == 1:
        return [batch]
    size = len(batch["images"])
    if size % parts:
        raise MedclipError(f"batch of {size} does not split into {parts} equal micro-batches")
    step = size // parts
    out = []
    for i in range(parts):
        sl = slice(i * step, (i + 1) * step)
        out.append({k: v[sl] if isinstance(v, (torch.Tensor, list, tuple)) else v for k, v in batch.items()})
    return out


# ----------------------------------------------------------------------------------------- data

def demo_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "demo_data"


def expand_placeholders(text: str | None, output_dir: Path) -> str | None:
    return text.replace("{output_dir}", str(output_dir)) if text else text


def prepare_demo(recipe, model_cfg: dict, output_dir: Path, is_main: bool) -> Path:
    """Build the synthetic demo set once (rank 0; the other ranks wait at the caller's barrier)."""
    from medclip.data.demo import build_demo, built_layout

    folder = demo_dir(output_dir)
    manifest = folder / "demo-train.yaml"
    if manifest.is_file() and (built := built_layout(manifest)) != recipe.data.demo_layout:  # e.g. on resume
        raise MedclipError(f"the demo set in {folder} was built with data.demo_layout {built}, the recipe asks for "
                           f"{recipe.data.demo_layout}: keep the layout, or use another run.output_dir")
    if is_main and not manifest.is_file():
        size = model_cfg["vision_cfg"].get("image_size", 64)
        size = max(size if isinstance(size, int) else max(size), 48)
        log.info("building the synthetic demo set in %s", folder)
        build_demo(folder, n_train=recipe.data.demo_train_samples, n_val=recipe.data.demo_val_samples,
                   seed=recipe.run.seed, image_size=size, layout=recipe.data.demo_layout)
    return manifest


def train_transform(recipe, model: nn.Module):
    """open_clip's training transform for the model, with the recipe's augmentation settings."""
    augmentation = AugmentationCfg(scale=tuple(recipe.data.crop_scale)) if recipe.data.crop_scale else None
    return image_transform_v2(PreprocessCfg(**build_preprocess_cfg(model)), is_train=recipe.data.augment,
                              aug_cfg=augmentation)


def build_data(recipe, model: nn.Module, model_cfg: dict, env, output_dir: Path,
               device: torch.device = torch.device("cpu")):
    """The rank's training stream over the recipe's sources (or the demo set), tokenized for the model.

    ``device``: where the trainer moves the batches (data.gpu_decode decodes JPEGs there when it is CUDA).
    """
    from medclip.data.device_decode import gpu_decode_available
    from medclip.data.manifest import load_manifest
    from medclip.data.stream import build_train_stream
    from medclip.training.distributed import barrier
    from medclip.training.prepare import build_source

    prepared = []
    if recipe.data.demo:
        prepared.append(prepare_demo(recipe, model_cfg, output_dir, env.is_main))
    for spec in recipe.data.build:
        spec = dataclasses.replace(spec, input=expand_placeholders(spec.input, output_dir))
        prepared.append(build_source(spec, output_dir / "shards") if env.is_main else
                        output_dir / "shards" / spec.name / f"{spec.name}.yaml")
    barrier()  # rank 0 may still be writing shards
    manifests = [load_manifest(path) for path in prepared]
    for source in recipe.data.sources:
        manifest = load_manifest(expand_placeholders(source.manifest, output_dir),
                                 root=expand_placeholders(source.root, output_dir))
        if source.weight is not None:
            manifest = dataclasses.replace(manifest, weight=source.weight)
        manifests.append(manifest)
    return build_train_stream(manifests, build_tokenizer(model_cfg), train_transform(recipe, model),
                              recipe.data.batch_size,
                              seed=recipe.run.seed, rank=env.rank, world_size=env.world_size,
                              num_workers=recipe.data.num_workers, shuffle_buffer=recipe.data.shuffle_buffer,
                              first_caption_share=recipe.data.first_caption_share,
                              long_captions=recipe.data.long_captions,
                              epoch_samples=recipe.data.epoch_samples, allow_pipe=recipe.data.allow_pipe,
                              fast_decode=recipe.data.fast_decode,
                              device_decode=gpu_decode_available(recipe.data.gpu_decode, device),
                              concept_name_length=CONCEPT_NAME_TOKENS if recipe.objective.use_concept_names else 0,
                              drop_last=True)  # ranks must hold equal batches for the gathered losses


def batches_forever(stream):
    """Epoch after epoch; the stream's own state says where each epoch stands."""
    while True:
        produced = False
        for batch in stream:
            produced = True
            yield batch
        if not produced:
            raise MedclipError("the training data yields no complete batch (fewer samples than the batch size?)")


# ----------------------------------------------------------------------------------------- evaluation

def evaluate(encoder, recipe, output_dir: Path, step: int, tag: str = "") -> dict:
    """Run the recipe's suites on ``encoder``; write result JSONs; return {suite/dataset/metric: value}.
    ``tag`` (the EMA weights: "ema"): results in eval/step_N-TAG, named TAG/suite/dataset/metric."""
    from medclip.evaluation.linear_probe import FeatureCache, ProbeConfig
    from medclip.evaluation.model import EmbedOptions, EvalModel
    from medclip.evaluation.report import write_result
    from medclip.evaluation.runner import RunOptions, evaluate_dataset
    from medclip.evaluation.suites import load_suite

    options = RunOptions(embed=EmbedOptions(batch_size=recipe.eval.batch_size, num_workers=0, progress=False),
                         probe=ProbeConfig(seeds=(0,)), cache=FeatureCache(output_dir / "feature_cache"))
    suffix = f"-{tag}" if tag else ""
    model = EvalModel(encoder, name=f"{Path(recipe.run.output_dir).name}@{step}{suffix}")
    out = output_dir / "eval" / f"step_{step}{suffix}"
    results = {}
    root = expand_placeholders(recipe.eval.root, output_dir)
    for suite_name in recipe.eval.suites:
        suite = load_suite(suite_name)
        suite_root = Path(root) if root else suite.root
        for spec in suite.datasets:
            record = evaluate_dataset(model, spec, suite_root, options, suite.name)
            write_result(record, out)
            if record["headline"] is not None:
                results[f"{tag + '/' if tag else ''}{suite.name}/{spec.name}/{spec.headline}"] = record["headline"]
    return results


def export_encoder(encoder, directory: Path) -> Path:
    import medclip

    return medclip.save(encoder, directory)
