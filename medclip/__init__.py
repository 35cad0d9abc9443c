"""medclip: contrastive medical vision-language pretraining and evaluation on top of open_clip."""

__version__ = "0.1.0"

from medclip.errors import MedclipError  # noqa: E402
from medclip.models.registry import list_models, register_model_configs  # noqa: E402

register_model_configs()

from medclip.models.encoder import Encoder  # noqa: E402
from medclip.models.loading import load, save  # noqa: E402

__all__ = ["Encoder", "MedclipError", "list_models", "load", "save", "__version__"]
