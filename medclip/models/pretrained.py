"""Named public checkpoints: where each is published, its licence and citation, and how to fetch it.

``medclip.load(NAME)`` downloads the entry's files from the Hugging Face hub (``huggingface_hub``,
its cache and token, so gated repositories work after accepting their terms); offline,
``medclip.load(NAME, checkpoint=PATH)`` reads the downloaded file or snapshot directory as it was
published. The family reader (:mod:`medclip.models.families`) maps it onto open_clip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from medclip.errors import MedclipError

BIOMEDBERT_BASE = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
BIOMEDBERT_LARGE = "microsoft/BiomedNLP-BiomedBERT-large-uncased-abstract"
PUBMEDBERT_FULLTEXT = "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext"

UNIMED_CITATION = ("Khattak, Kunhimon, Naseer, Khan, Khan. UniMed-CLIP: Towards a Unified Image-Text "
                   "Pretraining Paradigm for Diverse Medical Imaging Modalities. arXiv:2412.10372 (2024)")


@dataclass(frozen=True)
class Pretrained:
    """One published checkpoint. ``settings`` holds the family reader's published facts."""

    name: str
    family: str
    title: str
    hub_id: str
    filename: str | None  # one weights file; None: the whole repository snapshot
    licence: str
    citation: str
    architecture: str
    repo_type: str = "model"
    gated: bool = False
    inferred: str = ""  # what of this entry is not confirmed by the family's own code
    settings: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        kind = "datasets/" if self.repo_type == "dataset" else ""
        tail = f"/blob/main/{self.filename}" if self.filename else ""
        return f"https://huggingface.co/{kind}{self.hub_id}{tail}"


_UNIMED = dict(family="unimed", licence="CC BY-NC 4.0 (UniMed-CLIP repository)", citation=UNIMED_CITATION)

ENTRIES: dict[str, Pretrained] = {p.name: p for p in [
    Pretrained(
        name="biomedclip", family="biomedclip", title="BiomedCLIP",
        hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", filename=None, licence="MIT",
        citation=("Zhang et al. BiomedCLIP: a multimodal biomedical foundation model pretrained from fifteen "
                  "million scientific image-text pairs. arXiv:2303.00915 (2023)"),
        architecture="timm ViT-B/16 224 px + BiomedBERT (abstract), context 256, embed 512",
        settings={"text_hub_id": BIOMEDBERT_BASE, "context_length": 256},
    ),
    Pretrained(
        name="unimed-clip-b16", title="UniMed-CLIP ViT-B/16", hub_id="UzairK/unimed-clip-vit-b16",
        filename="unimed-clip-vit-b16.pt",
        architecture="ViT-B/16 224 px QuickGELU + BiomedBERT (abstract) base, context 256, embed 512",
        settings={"text_hub_id": BIOMEDBERT_BASE, "context_length": 256, "vision": {"width": 768, "layers": 12, "patch_size": 16,
                                                            "image_size": 224}}, **_UNIMED,
    ),
    Pretrained(
        name="unimed-clip-l14-336", title="UniMed-CLIP ViT-L/14-336, base text encoder",
        hub_id="UzairK/unimed_clip_vit_l14_base_text_encoder", filename="unimed_clip_vit_l14_base_text_encoder.pt",
        architecture="ViT-L/14 336 px QuickGELU + BiomedBERT (abstract) base, context 256, embed 768",
        settings={"text_hub_id": BIOMEDBERT_BASE, "context_length": 256, "vision": {"width": 1024, "layers": 24, "patch_size": 14,
                                                            "image_size": 336}}, **_UNIMED,
    ),
    Pretrained(
        name="unimed-clip-l14-336-large-text", title="UniMed-CLIP ViT-L/14-336, large text encoder",
        hub_id="UzairK/unimed_clip_vit_l14_large_text_encoder",
        filename="unimed_clip_vit_l14_large_text_encoder.pt",
        architecture="ViT-L/14 336 px QuickGELU + BiomedBERT (abstract) large, context 256, embed 768",
        inferred=("hub location: the authors link this checkpoint from a file share; the hub repository "
                  "and file name follow the naming of its two hub-hosted siblings"),
        settings={"text_hub_id": BIOMEDBERT_LARGE, "context_length": 256, "vision": {"width": 1024, "layers": 24, "patch_size": 14,
                                                             "image_size": 336}}, **_UNIMED,
    ),
    Pretrained(
        name="pmc-clip", family="pmc_clip", title="PMC-CLIP (beta)", hub_id="axiong/pmc_oa_beta",
        filename="checkpoint.pt", repo_type="dataset", licence="MIT (PMC-CLIP repository)",
        citation=("Lin, Zhao, Zhang, Wu, Zhang, Wang, Xie. PMC-CLIP: Contrastive Language-Image Pre-training "
                  "using Biomedical Documents. MICCAI 2023, arXiv:2303.07240"),
        architecture="ModifiedResNet-50 224 px + PubMedBERT (abstract+fulltext), context 77, embed 768",
        settings={"text_hub_id": PUBMEDBERT_FULLTEXT, "context_length": 77},
    ),
    Pretrained(
        name="conceptclip", family="conceptclip", title="ConceptCLIP", hub_id="JerrryNie/ConceptCLIP",
        filename=None, gated=True, licence="MIT",
        citation=("Nie et al. An Explainable Biomedical Foundation Model via Large-Scale Concept-Enhanced "
                  "Vision-Language Pre-training. arXiv:2501.15579 (2025)"),
        architecture=("timm SigLIP so400m/14 384 px (attention pool) + PubMedBERT (abstract+fulltext), "
                      "context 77, embed 1152, concept heads"),
        inferred=("key names of the HF release (gated) are taken to follow the training names; the open_clip "
                  "fork's training checkpoint (epoch_N.pt) is confirmed by its code"),
        settings={"text_hub_id": PUBMEDBERT_FULLTEXT, "context_length": 77},
    ),
    Pretrained(
        name="medsiglip-448", family="medsiglip", title="MedSigLIP 448", hub_id="google/medsiglip-448",
        filename=None, gated=True, licence="Health AI Developer Foundations terms of use",
        citation="Sellergren et al. MedGemma Technical Report. arXiv:2507.05201 (2025)",
        architecture="SigLIP so400m/14 448 px (attention pool) + SigLIP text 64 tokens, embed 1152",
        settings={"text_hub_id": "google/medsiglip-448", "context_length": 64},
    ),
]}


def get(name: str) -> Pretrained | None:
    return ENTRIES.get(str(name))


def list_pretrained(as_str: bool = False) -> list:
    """Named pretrained checkpoints as ``(name, source)`` pairs (``"name:source"`` with ``as_str``),
    open_clip's shape; ``source`` is the hub repository the weights come from."""
    pairs = [(p.name, p.hub_id) for p in ENTRIES.values()]
    return [f"{name}:{source}" for name, source in pairs] if as_str else pairs


def download(entry: Pretrained) -> Path:
    """The entry's file or snapshot directory, fetched into the Hugging Face cache."""
    try:
        import huggingface_hub

        if entry.filename:
            return Path(huggingface_hub.hf_hub_download(entry.hub_id, entry.filename, repo_type=entry.repo_type))
        return Path(huggingface_hub.snapshot_download(entry.hub_id, repo_type=entry.repo_type))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        gated = " (gated: accept its terms on the hub and log in with `hf auth login`)" if entry.gated else ""
        raise MedclipError(
            f"cannot fetch {entry.name} from {entry.url}{gated}: {first}; offline, download it elsewhere and "
            f"pass medclip.load({entry.name!r}, checkpoint=PATH)"
        ) from exc
