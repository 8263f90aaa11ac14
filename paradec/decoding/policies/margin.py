"""``margin``: each group commits exactly its scheduled quota, highest margin (top-1 minus top-2
probability) first (Dream's ``topk_margin``); with ``rank_temperature``, a draw without
replacement by that score (Dream's ``alg_temp``)."""

from paradec.decoding.policies import Policy, register
from paradec.ops.selection import TOPK

POLICY = register(Policy(
    name="margin",
    rule=TOPK,
    rank=lambda candidates: candidates.scores.by_name("margin"),
    help="top-k: highest margin (top-1 minus top-2 probability) first",
    by_score=True,
))
