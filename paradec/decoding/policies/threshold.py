"""``threshold``: every position whose confidence reaches ``threshold`` commits; each group
always commits its top-1 (and its floor, when a step budget must be met). Fast-dLLM's parallel
decoding rule."""

from paradec.decoding.policies import CHECK_EVERY, Policy, register
from paradec.ops.selection import THRESHOLD

POLICY = register(Policy(
    name="threshold",
    rule=THRESHOLD,
    rank=lambda candidates: candidates.scores.confidence,
    help="rule: every position whose confidence reaches threshold (always the top-1)",
    parameter="threshold",
    check_every=CHECK_EVERY,
))
