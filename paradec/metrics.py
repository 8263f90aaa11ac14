"""Diagnostics of decoding orders (ARness) and of data (SeqDep).

ARness: how autoregressive a decoding order is, read from a trace (the step that committed each
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


def without_fill(trace: list[int], tokens: list[int], bodies: list[tuple[int, int]], stops: set[int]) -> list[int]:
    """The trace with every position after a body's first stop token marked undecoded (-1):
    ARness of the decoded text, not of the EOS fill ``eos_closes_block`` writes after it.
    bodies: (start, end) canvas offsets of the regions the model writes."""
    out = list(trace)
    for start, end in bodies:
        cut = next((p for p in range(start, end) if tokens[p] in stops), end)
        out[cut + 1 : end] = [-1] * max(0, end - cut - 1)
    return out


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


# --- SeqDep (NAP paper, Eq. 4) -----------------------------------------------------------------
#
#   SeqDep(x, s) = 1/(N-1) * sum_{n=2..N} [ log p_AR(s_n | x, s_<n) - log p_AR(s_n | x) ]
#
# x: the prompt; s_1..s_N: the output's segments, whose concatenation is the output text;
# p_AR: a causal LM (the scorer); log p of a segment: the sum over its tokens (``per_token``
# divides each term by the segment's token count instead). Near 0: each segment is independent
# of the earlier ones given the prompt; large: a chain. The scorer reads ``[start] + x + s_1 ...``
# where start is its BOS token (EOS when it has none), so the first token of x or of a segment
# after an empty prompt has a context; every segment is tokenised on its own, so the scored
# sequence is the concatenation of the segments' tokens.


def seqdep(scorer, segments: Sequence[str], prompt: str = "", tokenizer=None, per_token: bool = False) -> float:
    """SeqDep of one text. scorer: a transformers causal LM (with ``tokenizer``) or a
    ``paradec.models.ar.ARModel``; segments: at least two non-empty strings."""
    gains = segment_gains(scorer, segments, prompt, tokenizer)
    return sum(g.per_token if per_token else g.total for g in gains) / len(gains)


class SegmentGain:
    """log p(s_n | x, s_<n) and log p(s_n | x) of one segment n >= 2, summed over its tokens."""

    def __init__(self, with_prefix: float, alone: float, tokens: int):
        self.with_prefix, self.alone, self.tokens = with_prefix, alone, tokens

    @property
    def total(self) -> float:
        return self.with_prefix - self.alone

    @property
    def per_token(self) -> float:
        return self.total / self.tokens


def segment_gains(scorer, segments: Sequence[str], prompt: str = "", tokenizer=None) -> list[SegmentGain]:
    """The terms of Eq. 4 for segments 2..N: one forward over the whole text gives every
    log p(s_n | x, s_<n); one batched forward over ``x + s_n`` rows gives every log p(s_n | x)."""
    import torch

    from paradec.errors import InputError

    model, tokenizer = _scorer(scorer, tokenizer)
    if len(segments) < 2:
        raise InputError(f"SeqDep needs at least 2 segments, got {len(segments)}")
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InputError("the scorer's tokenizer has neither a BOS nor an EOS token to start the context with")
    context = [start] + (encode(prompt) if prompt else [])
    pieces = [encode(s) for s in segments]
    empty = [i + 1 for i, p in enumerate(pieces) if not p]
    if empty:
        raise InputError(f"segments {empty} encode to no tokens; drop empty segments before scoring")
    limit = getattr(model.config, "max_position_embeddings", None)
    total = len(context) + sum(map(len, pieces))
    if limit is not None and total > limit:
        raise InputError(f"prompt + segments are {total} tokens, over the scorer's context of {limit}")
    device = next(model.parameters()).device
    with torch.no_grad():
        whole = torch.tensor([context + [t for p in pieces for t in p]], device=device)  # [1, T]
        logp = _token_logprobs(model, whole, torch.ones_like(whole))[0]  # [T - 1]: log p(token t+1 | <= t)
        bounds = [len(context)]
        for p in pieces:
            bounds.append(bounds[-1] + len(p))
        with_prefix = [logp[bounds[n] - 1 : bounds[n + 1] - 1].sum().item() for n in range(1, len(pieces))]
        rows = [context + p for p in pieces[1:]]
        width = max(map(len, rows))
        ids = torch.tensor([r + [start] * (width - len(r)) for r in rows], device=device)  # [N - 1, W], right-padded
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logp = _token_logprobs(model, ids, mask)  # [N - 1, W - 1]
        alone = [logp[i, len(context) - 1 : len(r) - 1].sum().item() for i, r in enumerate(rows)]
    return [SegmentGain(w, a, len(p)) for w, a, p in zip(with_prefix, alone, pieces[1:])]


def _token_logprobs(model, ids, mask):
    """log p(ids[:, t + 1] | ids[:, <= t]) in float64: [B, T - 1]."""
    import torch

    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].double()
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]


def _scorer(scorer, tokenizer):
    from paradec.errors import InputError

    if tokenizer is None and hasattr(scorer, "tokenizer") and hasattr(scorer, "model"):  # an ARModel
        return scorer.model, scorer.tokenizer
    if tokenizer is None:
        raise InputError("give the scorer's tokenizer, or an ARModel (which holds one)")
    return scorer, tokenizer
