"""Settings of the training stream (one object shared by every stage of it)."""

from __future__ import annotations

from dataclasses import dataclass

from medclip.data.windows import check_long_captions
from medclip.errors import MedclipError


def check_first_caption_share(share: float | None, name: str = "first_caption_share") -> None:
    if share is not None and not 0 <= share <= 1:
        raise MedclipError(f"{name} must be in [0, 1] (or null), got {share!r}")


@dataclass
class StreamConfig:
    batch_size: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_buffer: int = 1000  # raw samples held per worker (0: no sample shuffling)
    shuffle_shards: bool = True
    # Samples per epoch over all ranks and workers: scales every source's weight alike (medclip.data.mixing).
    # None: sum(weight * samples), e.g. every sample once when all weights are 1.
    epoch_samples: int | None = None
    drop_last: bool = False
    max_concepts: int | None = None  # cap per caption (None: all)
    prefetch_factor: int = 4
    # Ship uint8 images (the consumer normalises them, see the module doc) when the transform allows.
    uint8_images: bool = True
    # > 0: also emit `concept_name_tokens` [B, C, L] (each concept's name tokenized like a caption, L tokens),
    # for PC-Align's objective.use_concept_names.
    concept_name_length: int = 0
    # uint8 images only: augment an image whose R = G = B on its single band (bit-identical pixels,
    # a third of the resampling; see medclip.data.images.gray_transform). False: always RGB.
    gray_shortcut: bool = True
    # JPEGs at least twice the crop's output size are decoded at 1/2, 1/4 or 1/8 scale, the random crop
    # drawn on the full size first (same distribution; pixels differ slightly, see
    # medclip.data.reduced_decode). False: every image decoded at full size.
    fast_decode: bool = True
    # uint8 images only: JPEGs leave the workers undecoded, their crop and flips drawn, and the consumer's
    # normalize_batch decodes them on its device (medclip.data.device_decode). Other images: as without it.
    device_decode: bool = False
    # Chance of drawing a sample's first caption (a table's own caption comes before its label captions,
    # see training.prepare); the others share the rest evenly. None: every caption equally likely.
    first_caption_share: float | None = None
    # A caption longer than the text context: "head" truncates its end (open_clip's tokenizers), "window" draws
    # a run of whole sentences that fits, "concepts" one of those keeping the most concepts (medclip.data.windows).
    long_captions: str = "head"
    # Run the shell commands of pipe: shard URLs (the user trusts the manifests; off by default).
    allow_pipe: bool = False

    def __post_init__(self):
        if self.batch_size < 1:
            raise MedclipError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (0 <= self.rank < self.world_size):
            raise MedclipError(f"rank must be in [0, world_size), got {self.rank}/{self.world_size}")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise MedclipError("num_workers and shuffle_buffer must be >= 0")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise MedclipError(f"epoch_samples must be positive, got {self.epoch_samples}")
        check_first_caption_share(self.first_caption_share)
        check_long_captions(self.long_captions)

    @property
    def workers_per_rank(self) -> int:
        """Loader workers of one rank; 0 workers means one (in-process) reader."""
        return max(1, self.num_workers)
