"""The allowed values of the config's named choices (the CLI's ``choices=`` and the checks' ranges).
The policies are not listed here: they are the registry's (``paradec.decoding.policies.names()``)."""

from __future__ import annotations

from paradec.ops.scoring import SCORE_ON

MODES = ("nap", "ao", "ar_order", "random", "block")
ATTENTIONS = ("isolated", "canvas")
SCHEDULES = ("uniform", "linspace")
SUMMARY_ORDERS = ("after", "concurrent")
CACHES = ("none", "prefix", "dual")
PROMPT_KV = ("auto", "broadcast", "recompute")
GATHERS = ("tokens", "kv")
RESULTS_ON = ("rank0", "all")

__all__ = ["ATTENTIONS", "CACHES", "GATHERS", "MODES", "PROMPT_KV", "RESULTS_ON", "SCHEDULES", "SCORE_ON",
           "SUMMARY_ORDERS"]
