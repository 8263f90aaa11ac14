"""``mode="random"``: positions in a random order (a priority per position from the request's
``ORDER`` stream, keyed like every draw), each group's quota per step."""

from paradec.decoding.policies import Policy, register
from paradec.ops.selection import TOPK

POLICY = register(Policy(
    name="random",
    rule=TOPK,
    rank=lambda candidates: candidates.priority,
    help="a random order",
    order=True,
    draws_order=True,
))
