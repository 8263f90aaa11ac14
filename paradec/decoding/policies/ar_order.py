"""``mode="ar_order"``: the leftmost masked positions first, each group's quota per step."""

from paradec.decoding.policies import Policy, register
from paradec.ops.selection import TOPK

POLICY = register(Policy(
    name="ar_order",
    rule=TOPK,
    rank=lambda candidates: -candidates.position.float(),
    help="leftmost masked first",
    order=True,
))
