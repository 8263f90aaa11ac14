"""paradec: fast, multi-GPU decoding of masked diffusion language models."""

from paradec.errors import CheckpointError, ConfigError, InputError, ParadecError
from paradec.models import AttentionSpec, DiffusionModel, ModelSpec, PromptCache, load

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "CheckpointError",
    "ConfigError",
    "DiffusionModel",
    "InputError",
    "ModelSpec",
    "ParadecError",
    "PromptCache",
    "load",
]
