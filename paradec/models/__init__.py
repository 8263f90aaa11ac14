"""Single-device model code: the shared diffusion transformer, LLaDA/Dream checkpoint formats,
loading, and autoregressive models for baselines."""

from paradec.models.attention import AttentionSpec
from paradec.models.cache import PromptCache
from paradec.models.loading import DiffusionModel, build, builtin_models, load, reference_config
from paradec.models.spec import ModelSpec
from paradec.models.transformer import count_parameters
from paradec.models.transformer_config import TransformerConfig

__all__ = [
    "AttentionSpec",
    "DiffusionModel",
    "ModelSpec",
    "PromptCache",
    "TransformerConfig",
    "build",
    "builtin_models",
    "count_parameters",
    "load",
    "reference_config",
]
