"""The allowed values of the config's named choices (the CLI's ``choices=`` and the checks' ranges)."""

from __future__ import annotations

from paradec.ops.scoring import SCORE_ON

MODES = ("nap", "ao", "ar_order", "random", "block")
POLICIES = ("confidence", "margin", "entropy", "threshold", "factor")
RULE_POLICIES = ("threshold", "factor")  # commit by a rule, not a fixed count
TOPK_POLICIES = ("confidence", "margin", "entropy")  # rank by a score; rank_temperature applies to them
ATTENTIONS = ("isolated", "canvas")
SCHEDULES = ("uniform", "linspace")
SUMMARY_ORDERS = ("after", "concurrent")
CACHES = ("none", "prefix", "dual")
PROMPT_KV = ("auto", "broadcast", "recompute")
GATHERS = ("tokens", "kv")
RESULTS_ON = ("rank0", "all")

__all__ = ["ATTENTIONS", "CACHES", "GATHERS", "MODES", "POLICIES", "PROMPT_KV", "RESULTS_ON", "RULE_POLICIES",
           "SCHEDULES", "SCORE_ON", "SUMMARY_ORDERS", "TOPK_POLICIES"]
