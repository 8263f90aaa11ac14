"""The generation config: per-request decoding parameters (``RequestParams``), runtime settings
(``RuntimeSettings``) and distributed settings (``DistributedSettings``), flat in
``GenerationConfig``; ``validate`` is the one entry point that runs every check (the context
checks when given the layout, the runner's groups, the ranks, the model's maximum length)."""

from paradec.config.choices import (ATTENTIONS, CACHES, GATHERS, MODES, PROMPT_KV, RESULTS_ON, SCHEDULES, SCORE_ON,
                                    SUMMARY_ORDERS)
from paradec.config.generation import GenerationConfig, settings_help
from paradec.config.params import DistributedSettings, RequestParams, RuntimeSettings, window_lengths
from paradec.config.validation import validate

__all__ = ["ATTENTIONS", "CACHES", "GATHERS", "MODES", "PROMPT_KV", "RESULTS_ON", "SCHEDULES", "SCORE_ON",
           "SUMMARY_ORDERS", "DistributedSettings", "GenerationConfig",
           "RequestParams", "RuntimeSettings", "settings_help", "validate", "window_lengths"]
