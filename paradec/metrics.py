"""How autoregressive a decoding order is, read from a trace (the step that committed each
position; -1 for positions never decoded, such as headers).

Following Gong et al. 2025 (DiffuCoder), as the NAP paper (section 2.2) uses them:

- Global ARness@k: the share of decoded tokens that, when decoded, sat among the k leftmost
  positions still masked.
- Local ARness@k: the share of decoded tokens that, with the k - 1 tokens decoded just before
  them, continue a left-to-right run: each of the k is decoded at the position right after the
  one decoded before it.

Several tokens committed in one step are taken in position order, as if decoded one after
another inside the step; so decoding the n leftmost masked positions per step (``ar_order``)
scores 1.0 on both. Positions are canvas offsets: across think blocks the canvas is one
left-to-right sequence, so parallel blocks score low globally by design.
"""

from __future__ import annotations

from collections.abc import Sequence


def decode_order(trace: Sequence[int]) -> list[int]:
    """Decoded positions in the order they were decoded: by step, then by position."""
    return [p for _, p in sorted((s, p) for p, s in enumerate(trace) if s >= 0)]


def global_arness(trace: Sequence[int], k: int = 1) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = decode_order(trace)
    if not order:
        return 0.0
    remaining = _Fenwick(len(trace))
    for p in order:
        remaining.add(p, 1)
    hits = 0
    for p in order:
        hits += remaining.prefix(p) < k  # masked positions strictly left of p
        remaining.add(p, -1)
    return hits / len(order)


def local_arness(trace: Sequence[int], k: int = 1) -> float:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    order = decode_order(trace)
    if len(order) <= k:
        return 0.0
    steps_right = [b == a + 1 for a, b in zip(order, order[1:])]  # [n - 1]
    hits = sum(all(steps_right[i - k + 1 : i + 1]) for i in range(k - 1, len(steps_right)))
    return hits / (len(order) - k)


class _Fenwick:
    """Counts over positions 0..n-1 with prefix sums in O(log n)."""

    def __init__(self, n: int):
        self.tree = [0] * (n + 1)

    def add(self, index: int, delta: int) -> None:
        i = index + 1
        while i < len(self.tree):
            self.tree[i] += delta
            i += i & -i

    def prefix(self, index: int) -> int:
        """Sum over positions < index."""
        total, i = 0, index
        while i > 0:
            total += self.tree[i]
            i -= i & -i
        return total
