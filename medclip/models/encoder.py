"""The object `medclip.load` returns: an open_clip model with its preprocess and tokenizer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from medclip.errors import MedclipError
from medclip.imaging import MedicalPreprocess
from medclip.models import towers
from medclip.models.heads import ConceptHeads

AMP_DTYPES = {"amp": torch.float16, "amp_bf16": torch.bfloat16, "amp_bfloat16": torch.bfloat16}


def tensor_batch(images: torch.Tensor) -> torch.Tensor:
    """A model-input tensor as [B, 3, H, W]: [H, W] is one single-channel image, [C, H, W] one image.

    Tensors are taken as preprocessed pixels. One channel is repeated to the model's three, as a gray
    image is converted to RGB before preprocessing.
    """
    if images.ndim == 2:
        images = images.unsqueeze(0)
    if images.ndim == 3:
        images = images.unsqueeze(0)
    if images.ndim != 4:
        raise MedclipError(f"image tensor must be [B, C, H, W], [C, H, W] or [H, W], got {tuple(images.shape)}")
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] != 3:
        raise MedclipError(f"image tensor has {images.shape[1]} channels (shape {tuple(images.shape)}): "
                           f"give 3 (RGB) or 1 (gray) channels")
    return images


class Encoder:
    """Embeds images and text with an open_clip model.

    ``model`` is the plain open_clip module (``CLIP`` or ``CustomTextCLIP``), ``preprocess`` maps
    one image (PIL, path, DICOM path, 16-bit array) to a normalized tensor, ``tokenizer`` maps a
    list of strings to token ids, and ``heads`` holds PC-Align's heads when the model has them.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: MedicalPreprocess,
        tokenizer,
        model_cfg: dict,
        preprocess_cfg: dict,
        name: str = "",
        precision: str = "fp32",
        heads: ConceptHeads | None = None,
        text_tower_name: str | None = None,
    ):
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.model_cfg = model_cfg
        self.preprocess_cfg = preprocess_cfg
        self.name = name
        self.precision = precision
        self.heads = heads.eval() if heads is not None else None
        # Hub id of the HF text tower when it is the published one (exports name it), else None.
        self.text_tower_name = text_tower_name

    def __repr__(self) -> str:
        return f"Encoder(name={self.name!r}, device={self.device}, precision={self.precision!r})"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    def to(self, device) -> Encoder:
        self.model.to(device)
        if self.heads is not None:
            self.heads.to(device)
        return self

    def _autocast(self):
        dtype = AMP_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _input_dtype(self) -> torch.dtype:
        return {"fp16": torch.float16, "bf16": torch.bfloat16, "pure_fp16": torch.float16,
                "pure_bf16": torch.bfloat16}.get(self.precision, torch.float32)

    def image_batches(self, images, batch_size: int) -> Iterator[torch.Tensor]:
        """Preprocessed image tensors on the model's device, ``batch_size`` at a time."""
        if isinstance(images, torch.Tensor):
            images = tensor_batch(images)
            for start in range(0, len(images), batch_size):
                yield images[start:start + batch_size].to(self.device, self._input_dtype())
            return
        if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
            images = [images]
        for start in range(0, len(images), batch_size):
            chunk = [tensor_batch(img)[0] if isinstance(img, torch.Tensor) else self.preprocess(img)
                     for img in images[start:start + batch_size]]
            yield torch.stack(chunk).to(self.device, self._input_dtype())

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """[N, D] float32 image embeddings on the CPU."""
        out = []
        with self._autocast():
            for batch in self.image_batches(images, batch_size):
                out.append(self.model.encode_image(batch).float().cpu())
        feats = torch.cat(out)
        return F.normalize(feats, dim=-1) if normalize else feats

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts))

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """[N, D] float32 text embeddings on the CPU."""
        if isinstance(texts, str):
            texts = [texts]
        out = []
        with self._autocast():
            for start in range(0, len(texts), batch_size):
                ids = self.tokenize(texts[start:start + batch_size]).to(self.device)
                out.append(self.model.encode_text(ids).float().cpu())
        feats = torch.cat(out) if out else torch.empty(0, self.embed_dim)
        return F.normalize(feats, dim=-1) if normalize else feats

    @torch.no_grad()
    def patch_embeddings(self, images, batch_size: int = 64, normalize: bool = False) -> torch.Tensor:
        """[N, patches, D]: each patch token projected into the joint image-text space."""
        out = []
        with self._autocast():
            for batch in self.image_batches(images, batch_size):
                _, tokens = towers.image_tokens(self.model, batch)
                out.append(towers.project_patches(self.model, tokens).float().cpu())
        feats = torch.cat(out)
        return F.normalize(feats, dim=-1) if normalize else feats

    @property
    def grid_size(self) -> tuple[int, int]:
        return towers.grid_size(self.model)
