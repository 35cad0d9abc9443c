"""medclip: contrastive medical vision-language pretraining and evaluation on top of open_clip.

``import medclip`` is cheap: the public functions load their modules (and torch) on first use, so
the ``medclip`` command answers ``--help`` without importing torch. Importing medclip changes nothing
outside it (no file written, no import hook, no other library's globals): medclip's architectures
reach open_clip's table, in memory, when a medclip function needs them or on
``medclip.register_model_configs()``, which code that then uses ``open_clip.create_model("medclip-tiny")``
calls once.
"""

from typing import TYPE_CHECKING

from medclip import _lazy
from medclip.errors import MedclipError

__version__ = "0.1.0"

if TYPE_CHECKING:  # imported on first use (medclip._lazy)
    from medclip.models.encoder import Encoder
    from medclip.models.factory import (
        create_model,
        create_model_and_transforms,
        get_tokenizer,
        list_models,
        list_pretrained,
    )
    from medclip.models.loading import RandomWeightsWarning, load, save
    from medclip.models.registry import register_model_configs
    from medclip.training.api import pretrain

__all__ = ["Encoder", "MedclipError", "RandomWeightsWarning", "create_model", "create_model_and_transforms",
           "get_tokenizer", "list_models", "list_pretrained", "load", "pretrain", "register_model_configs",
           "save", "__version__"]

_lazy.attach(__name__)
