"""How many tokens a group commits at each of its steps."""

from __future__ import annotations

import numpy as np

LINSPACE_EPS = 1e-3  # Dream's final timestep


def group_schedule(length: int, steps: int | None, tokens_per_step: int | None, kind: str) -> list[int]:
    """Tokens to commit at each step for a body of ``length`` masked tokens; every entry >= 1
    and the entries sum to ``length``.

    tokens_per_step k: k each step (the last takes what is left). Otherwise over ``steps``
    (capped at ``length``, since every step commits at least one token): ``uniform`` splits as
    LLaDA does (the remainder goes to the first steps); ``linspace`` follows Dream's timesteps
    t_i = linspace(1, eps, steps + 1), committing the fraction 1 - t_{i+1} / t_i of what is
    still masked, and everything at the last step.
    """
    if tokens_per_step is not None and steps is None:
        full, rest = divmod(length, tokens_per_step)
        return [tokens_per_step] * full + ([rest] if rest else [])
    if steps is None:
        steps = length
    if tokens_per_step is not None:  # both given: k per step, the budget was validated
        return group_schedule(length, None, tokens_per_step, kind)
    steps = min(steps, length)
    if kind == "uniform":
        base, rest = divmod(length, steps)
        return [base + 1] * rest + [base] * (steps - rest)
    times = np.linspace(1.0, LINSPACE_EPS, steps + 1)
    quotas, remaining = [], length
    for i in range(steps):
        steps_after = steps - 1 - i
        n = remaining if steps_after == 0 else int(remaining * (1.0 - times[i + 1] / times[i]))
        n = min(max(n, 1), remaining - steps_after)  # leave one token for each later step
        quotas.append(n)
        remaining -= n
    return quotas
