"""Training objectives: IT-Align (InfoNCE / sigmoid), PC-Align (patch-concept), and their sum."""

from medclip.losses.distributed import World
from medclip.losses.it_align import (
    SIGMOID_INITS,
    clamp_logit_scales_,
    hash_captions,
    infonce_loss,
    init_logit_params_,
    sigmoid_loss,
)
from medclip.losses.objective import Features, Objective, ObjectiveConfig, concat_features
from medclip.losses.pc_align import PCAlignConfig, pc_align_loss

__all__ = [
    "SIGMOID_INITS", "Features", "Objective", "ObjectiveConfig", "PCAlignConfig", "World",
    "clamp_logit_scales_", "concat_features", "hash_captions", "infonce_loss", "init_logit_params_", "pc_align_loss",
    "sigmoid_loss",
]
