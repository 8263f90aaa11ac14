"""``factor`` (Fast-dLLM): the n-th most confident position of a group (n from 1) commits when its
confidence >= 1 - factor / (n + 1). The bound rises with n while the ranked confidences fall, so
the accepted positions are always a top-n prefix. Each group always commits its top-1 (and its
floor, when a step budget must be met)."""

from paradec.decoding.policies import CHECK_EVERY, Policy, register
from paradec.ops.selection import FACTOR

POLICY = register(Policy(
    name="factor",
    rule=FACTOR,
    rank=lambda candidates: candidates.scores.confidence,
    help="rule (Fast-dLLM): the n-th best commits if its confidence >= 1 - factor / (n + 1)",
    parameter="factor",
    check_every=CHECK_EVERY,
))
