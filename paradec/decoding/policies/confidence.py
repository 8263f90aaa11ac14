"""``confidence``: each group commits exactly its scheduled quota, highest confidence (max
probability) first (Dream's ``maskgit_plus``); with ``rank_temperature``, a draw without
replacement by that score (Dream's ``alg_temp``)."""

from paradec.decoding.policies import Policy, register
from paradec.ops.selection import TOPK

POLICY = register(Policy(
    name="confidence",
    rule=TOPK,
    rank=lambda candidates: candidates.scores.by_name("confidence"),
    help="top-k: highest confidence (max probability) first",
    by_score=True,
))
