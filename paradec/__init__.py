"""paradec: fast, multi-GPU decoding of masked diffusion language models."""

from paradec.api import GenerationResult, generate
from paradec.config import DistributedSettings, GenerationConfig, RequestParams, RuntimeSettings
from paradec.engine import Engine, engine_for
from paradec.errors import CheckpointError, ConfigError, InputError, ParadecError
from paradec.models import AttentionSpec, DiffusionModel, ModelSpec, PromptCache, load

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "CheckpointError",
    "ConfigError",
    "DiffusionModel",
    "DistributedSettings",
    "Engine",
    "GenerationConfig",
    "GenerationResult",
    "InputError",
    "ModelSpec",
    "ParadecError",
    "PromptCache",
    "RequestParams",
    "RuntimeSettings",
    "engine_for",
    "generate",
    "load",
]
