"""paradec: fast, multi-GPU decoding of masked diffusion language models."""

from paradec.api import GenerationResult, generate
from paradec.config import GenerationConfig
from paradec.errors import CheckpointError, ConfigError, InputError, ParadecError
from paradec.models import AttentionSpec, DiffusionModel, ModelSpec, PromptCache, load

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "CheckpointError",
    "ConfigError",
    "DiffusionModel",
    "GenerationConfig",
    "GenerationResult",
    "InputError",
    "ModelSpec",
    "ParadecError",
    "PromptCache",
    "generate",
    "load",
]
