"""medclip: contrastive medical vision-language pretraining and evaluation on top of open_clip."""

__version__ = "0.1.0"

from medclip.errors import MedclipError  # noqa: E402
from medclip.models.registry import register_model_configs  # noqa: E402

register_model_configs()

from medclip.models.encoder import Encoder  # noqa: E402
from medclip.models.factory import (  # noqa: E402
    create_model,
    create_model_and_transforms,
    get_tokenizer,
    list_models,
    list_pretrained,
)
from medclip.models.loading import RandomWeightsWarning, load, save  # noqa: E402

__all__ = ["Encoder", "MedclipError", "RandomWeightsWarning", "create_model", "create_model_and_transforms",
           "get_tokenizer", "list_models", "list_pretrained", "load", "save", "__version__"]
