"""open_clip's entry points with open_clip's signatures and return shapes, over everything medclip loads.

``create_model_and_transforms`` / ``create_model`` return the plain open_clip module (``CLIP`` /
``CustomTextCLIP``), so code written for open_clip runs unchanged on BiomedCLIP, UniMed-CLIP, PMC-CLIP,
ConceptCLIP and MedSigLIP weights; :func:`medclip.load` returns the richer :class:`~medclip.Encoder`.
"""

from __future__ import annotations

from pathlib import Path

from open_clip.tokenizer import HFTokenizer
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2, merge_preprocess_dict

from medclip.errors import MedclipError
from medclip.imaging import MedicalPreprocess
from medclip.models import pretrained as pretrained_models
from medclip.models import registry
from medclip.models.export import HUB_CONFIG, read_hub_config, resolve_bundled
from medclip.models.loading import build_tokenizer, load, resolve_config


def _load(model_name: str, pretrained, precision: str, device, hf_text_dir, window):
    entry = pretrained_models.get(model_name)
    checkpoint = pretrained
    if entry is not None and (pretrained in (None, True, "") or pretrained == entry.hub_id):
        checkpoint = None  # the published weights, fetched
    elif entry is None and pretrained is not None and not Path(str(pretrained)).exists():
        raise MedclipError(f"pretrained={pretrained!r} for {model_name}: not a file or directory (medclip's "
                           f"named models carry their weights: medclip.list_pretrained())")
    return load(model_name, device=device, precision=precision, checkpoint=checkpoint, hf_text_dir=hf_text_dir,
                window=window)


def create_model_and_transforms(
    model_name: str,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    image_mean: tuple | None = None,
    image_std: tuple | None = None,
    image_interpolation: str | None = None,
    image_resize_mode: str | None = None,
    aug_cfg: dict | AugmentationCfg | None = None,
    output_dict: bool | None = None,
    hf_text_dir: str | Path | None = None,
    window=None,
):
    """``(model, preprocess_train, preprocess_val)`` as in open_clip.

    Args:
        model_name: a named pretrained model (``medclip.list_pretrained()``), a medclip or open_clip
            architecture (``medclip.list_models()``), an export directory / ``local-dir:DIR`` or a
            training checkpoint.
        pretrained: for a named model, ``None`` (or its hub id) fetches the published weights and a
            path reads the downloaded file or snapshot offline; for an architecture, a weights file
            (``None`` builds random weights, with a warning).
        precision, device: as in open_clip (``fp32``, ``fp16``, ``bf16``, ``amp``...; ``cpu``, ``cuda``).
        image_mean, image_std, image_interpolation, image_resize_mode: override the model's
            preprocessing (open_clip's names).
        aug_cfg: open_clip's ``AugmentationCfg`` (or dict) for ``preprocess_train``.
        output_dict: set ``model.output_dict`` (open_clip's forward returns a dict).
        hf_text_dir: local HF text tower directory (config + tokenizer), for offline use.
        window: intensity window for DICOM / 16-bit input (``medclip.imaging.Window``).

    Returns:
        The open_clip module in eval mode, the training transform (open_clip's, with ``aug_cfg``) and
        the evaluation transform (open_clip's, also reading DICOM and 16-bit images).
    """
    encoder = _load(model_name, pretrained, precision, device, hf_text_dir, window)
    overrides = {k: v for k, v in {"mean": image_mean, "std": image_std, "interpolation": image_interpolation,
                                   "resize_mode": image_resize_mode}.items() if v is not None}
    cfg = PreprocessCfg(**merge_preprocess_dict(encoder.preprocess_cfg, overrides))
    preprocess_train = image_transform_v2(cfg, is_train=True, aug_cfg=aug_cfg)
    preprocess_val = MedicalPreprocess(image_transform_v2(cfg, is_train=False), window) if overrides \
        else encoder.preprocess
    if output_dict is not None:
        encoder.model.output_dict = output_dict
    return encoder.model, preprocess_train, preprocess_val


def create_model(
    model_name: str,
    pretrained: str | None = None,
    precision: str = "fp32",
    device: str = "cpu",
    output_dict: bool | None = None,
    hf_text_dir: str | Path | None = None,
):
    """The open_clip module alone; arguments as in :func:`create_model_and_transforms`."""
    model = _load(model_name, pretrained, precision, device, hf_text_dir, None).model
    if output_dict is not None:
        model.output_dict = output_dict
    return model


def get_tokenizer(model_name: str = "", context_length: int | None = None, hf_text_dir: str | Path | None = None,
                  **kwargs):
    """The tokenizer of a model name, as in open_clip: call it on a list of strings for [N, L] ids.

    Named pretrained models use their text tower's tokenizer (from ``hf_text_dir`` offline, else the
    hub / HF cache) at the family's context length; architectures and export directories their config's.
    """
    entry = pretrained_models.get(model_name)
    if entry is not None:
        source = str(hf_text_dir) if hf_text_dir is not None else entry.settings["text_hub_id"]
        try:
            return HFTokenizer(source, context_length=context_length or entry.settings["context_length"], **kwargs)
        except OSError as exc:
            raise MedclipError(f"cannot load the tokenizer of {model_name} from {source}: "
                               f"{str(exc).splitlines()[0]} (offline? pass hf_text_dir=DIR)") from exc
    ref = model_name[len("local-dir:"):] if model_name.startswith("local-dir:") else model_name
    if Path(ref).is_dir():
        if not (Path(ref) / HUB_CONFIG).is_file():
            raise MedclipError(f"{ref} is not a model directory: {HUB_CONFIG} is missing")
        model_cfg = read_hub_config(Path(ref))["model_cfg"]
        return build_tokenizer(resolve_bundled(model_cfg, Path(ref)))
    cfg = resolve_config(model_name, hf_text_dir)
    if context_length is not None or kwargs:
        text_cfg = cfg.setdefault("text_cfg", {})
        text_cfg["context_length"] = context_length or text_cfg.get("context_length", 77)
        text_cfg["tokenizer_kwargs"] = {**text_cfg.get("tokenizer_kwargs", {}), **kwargs}
    return build_tokenizer(cfg)


def list_models() -> list[str]:
    """Names ``create_model`` / ``medclip.load`` accept: medclip's architectures and named pretrained models."""
    return registry.list_models() + list(pretrained_models.ENTRIES)


list_pretrained = pretrained_models.list_pretrained
