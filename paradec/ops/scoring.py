"""Token choice and confidence scores from the logits of masked positions (plain torch): the
twin of the score kernel (``score_twin``) and the sampling settings and scores it shares with it.

The chosen token is the argmax, or at temperature T > 0 a Gumbel-max sample computed in
float64: argmax(logits / T + g), g = -log(-log u), the same draw as LLaDA's
``exp(logits) / (-log u) ** T``. With ``top_k`` / ``top_p`` (transformers' order: temperature,
then top-k, then top-p) the draw is restricted to the kept tokens of softmax(logits / T), again
in float64 (``sampling_keep``). Scores come from the softmax at temperature 1 (``score_on=
"model"``, LLaDA) or from the distribution the token is drawn from (``"sampling"``: temperature
and filters applied, Dream): confidence is the chosen token's probability, margin the top-1
minus top-2 probability, and negative entropy sum(p log p). Barred ids (the mask id always, stop
ids where asked) are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.ops import batch_invariant

SCORE_ON = ("model", "sampling")


@dataclass(frozen=True)
class Sampling:
    """The sampling settings a step's scoring needs beyond the temperature (one request's, or
    one batch's: a runner decodes one config). top_k, top_p: None is off; score_on: ``model`` or
    ``sampling``; rank_temperature: > 0 turns a top-k policy's best-first ranking into a draw
    without replacement from softmax(score / rank_temperature) (Dream's ``alg_temp``)."""

    top_k: int | None = None
    top_p: float | None = None
    score_on: str = "model"
    rank_temperature: float = 0.0

    @classmethod
    def of(cls, config) -> Sampling:
        return cls(config.top_k, config.top_p, config.score_on, config.rank_temperature)

    @property
    def filters(self) -> bool:
        return self.top_k is not None or self.top_p is not None

    @property
    def plain(self) -> bool:
        """Nothing beyond temperature sampling: what the fused score kernel computes."""
        return not self.filters and self.score_on == "model"


@dataclass
class Scores:
    tokens: torch.Tensor  # [N] chosen ids
    confidence: torch.Tensor  # [N] fp32
    margin: torch.Tensor  # [N] fp32
    neg_entropy: torch.Tensor  # [N] fp32
    rank_noise: torch.Tensor | None = None  # [N] float64 Gumbel noise for rank_temperature
    rank_temperature: float = 0.0

    def by_name(self, name: str) -> torch.Tensor:
        """The ranking score of a top-k policy: the named score, best first; with a rank
        temperature, score / rank_temperature + Gumbel noise, so that taking the best k draws k
        positions without replacement with probability softmax(score / rank_temperature)
        (Gumbel-top-k; Dream's ``alg_temp`` multinomial draw)."""
        score = {"confidence": self.confidence, "margin": self.margin, "entropy": self.neg_entropy}[name]
        if self.rank_temperature > 0:
            if self.rank_noise is None:
                raise ValueError("rank_temperature > 0 needs rank_noise")
            return score.double() / self.rank_temperature + self.rank_noise
        return score


def sampling_keep(scaled: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """[N, V] bool: the tokens a draw may choose from, given ``scaled`` = logits / T ([N, V],
    float64, -inf where barred). top_k keeps every token whose scaled logit reaches the k-th
    largest (ties at the k-th all kept); top_p then keeps, of those, every token whose
    probability (renormalised over the kept ones) is at least the smallest probability of the
    shortest most-likely-first prefix whose mass reaches top_p — i.e. a token is kept when the
    mass of the tokens strictly more likely than it is below top_p (ties kept together). Both
    always keep the most likely token. Each row is computed on its own, in float64."""
    keep = torch.ones_like(scaled, dtype=torch.bool)
    vocab = scaled.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        keep = scaled >= kth
    if top_p is not None and top_p < 1.0:
        probs = torch.softmax(torch.where(keep, scaled, float("-inf")), dim=-1)  # [N, V] float64
        ordered = probs.sort(dim=-1, descending=True).values
        reach = (ordered.cumsum(-1) < top_p).sum(-1, keepdim=True).clamp(max=vocab - 1)  # [N, 1]
        keep = keep & (probs >= ordered.gather(-1, reach))
    return keep


def score_logits(
    logits: torch.Tensor,
    mask_id: int,
    stop_ids: tuple[int, ...] | torch.Tensor,
    bar_stop: torch.Tensor,
    temperature: float = 0.0,
    uniform_noise: torch.Tensor | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    score_on: str = "model",
) -> Scores:
    """logits: [N, V]; stop_ids: ids or an [S] tensor (on the logits' device: no host sync, so a
    CUDA graph can capture this); bar_stop: [N] bool, rows where stop ids are barred;
    uniform_noise: [N, V] float64 in (0, 1), needed when temperature > 0.
    top_k, top_p: restrict the draw (temperature > 0; greedy choice keeps the argmax anyway);
    score_on: ``model`` scores at temperature 1 unfiltered, ``sampling`` on the draw's own
    distribution (temperature and filters applied).

    Edge rows: a row with +inf logits is scored as the softmax's limit, uniform over them (the
    first one is chosen); a row with no allowed finite logit chooses -1 with zero scores.
    """
    if score_on not in SCORE_ON:
        raise ValueError(f"score_on must be one of {list(SCORE_ON)}, got {score_on!r}")
    logits = logits.float()
    logits[:, mask_id] = float("-inf")
    stops = torch.as_tensor(stop_ids, dtype=torch.long, device=logits.device)
    if stops.numel():
        logits[:, stops] = torch.where(bar_stop[:, None], float("-inf"), logits[:, stops])
    positive_inf = torch.isposinf(logits)
    has_inf = positive_inf.any(-1, keepdim=True)
    finite = torch.where(has_inf, torch.where(positive_inf, 0.0, float("-inf")), logits)
    empty = ~(finite > float("-inf")).any(-1)  # [N] nothing allowed
    finite = torch.where(empty[:, None], 0.0, finite)
    keep = scaled = None
    if top_k is not None or top_p is not None or score_on == "sampling":
        scaled = finite.double() / temperature if temperature > 0 else finite.double()  # [N, V] float64
        if top_k is not None or top_p is not None:
            keep = sampling_keep(scaled, top_k, top_p)
    if score_on == "sampling":
        log_probs = torch.log_softmax(scaled if keep is None else scaled.masked_fill(~keep, float("-inf")), -1).float()
    else:
        log_probs = torch.log_softmax(finite, dim=-1)  # [N, V]
    probs = log_probs.exp()
    if temperature > 0:
        gumbel = -torch.log(-torch.log(uniform_noise))
        drawn = logits.double() / temperature
        if keep is not None:
            drawn = drawn.masked_fill(~keep, float("-inf"))
        tokens = (drawn + gumbel).argmax(-1)
    else:
        tokens = logits.argmax(-1)  # the filters always keep the argmax
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values  # [N, 2]
    second = top2[:, 1] if top2.shape[-1] > 1 else torch.zeros_like(top2[:, 0])
    neg_entropy = torch.where(probs > 0, probs * log_probs, 0.0).sum(-1)
    confidence = probs.gather(1, tokens[:, None])[:, 0]
    zero = torch.zeros_like(confidence)
    return Scores(
        tokens=torch.where(empty, -1, tokens),
        confidence=torch.where(empty, zero, confidence),
        margin=torch.where(empty, zero, top2[:, 0] - second),
        neg_entropy=torch.where(empty, zero, neg_entropy),
    )


def score_twin(logits: torch.Tensor, rows: torch.Tensor, mask_id: int, stop_ids: torch.Tensor, bar_stop: torch.Tensor,
               temperature: float = 0.0, noise: torch.Tensor | None = None,
               sampling: Sampling | None = None) -> Scores:
    """The score kernel's arguments (``paradec.ops.score``) on ``score_logits``: logits [R, V];
    rows [N]; stop_ids [S]; bar_stop [N]; noise [N, V] float64 uniforms (temperature > 0)."""
    s = sampling or Sampling()
    if logits.is_cuda and batch_invariant.enabled() and rows.numel():
        return _in_chunks(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise, s)
    return score_logits(logits[rows], mask_id, stop_ids, bar_stop, temperature, noise,
                        s.top_k, s.top_p, s.score_on)


INVARIANT_CHUNK = 32  # rows of every ``score_logits`` call in the batch-invariant mode


def _in_chunks(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise, s: Sampling) -> Scores:
    """``score_logits`` over calls of exactly ``INVARIANT_CHUNK`` rows (the last padded by
    repeating a row): torch picks how to split a row's sums by the number of rows, so a call of
    one shape gives each row the same bits whatever its neighbours (the batch-invariant mode)."""
    n = rows.shape[0]
    pad = -n % INVARIANT_CHUNK
    index = torch.cat((torch.arange(n, device=rows.device), torch.zeros(pad, dtype=torch.long, device=rows.device)))
    parts = [score_logits(logits[rows[at]], mask_id, stop_ids, bar_stop[at], temperature,
                          None if noise is None else noise[at], s.top_k, s.top_p, s.score_on)
             for at in index.split(INVARIANT_CHUNK)]
    return Scores(*(torch.cat([getattr(p, name) for p in parts])[:n]
                    for name in ("tokens", "confidence", "margin", "neg_entropy")))
