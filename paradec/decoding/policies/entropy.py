"""``entropy``: each group commits exactly its scheduled quota, lowest entropy first (Dream's
``entropy``); with ``rank_temperature``, a draw without replacement by that score (Dream's
``alg_temp``)."""

from paradec.decoding.policies import Policy, register
from paradec.ops.selection import TOPK

POLICY = register(Policy(
    name="entropy",
    rule=TOPK,
    rank=lambda candidates: candidates.scores.by_name("entropy"),
    help="top-k: lowest entropy first",
    by_score=True,
))
