"""The validated generation config. Every bad value is refused before any work starts, with
the field's name and its allowed range in the message."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from paradec.errors import ConfigError

MODES = ("nap", "ao", "ar_order", "random")
POLICIES = ("confidence", "margin", "entropy", "threshold", "factor")
RULE_POLICIES = ("threshold", "factor")  # commit by a rule, not a fixed count
ATTENTIONS = ("isolated", "canvas")
SCHEDULES = ("uniform", "linspace")
SUMMARY_ORDERS = ("after", "concurrent")
PROMPT_KV = ("auto", "broadcast", "recompute")
GATHERS = ("tokens", "kv")
RESULTS_ON = ("rank0", "all")


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode.

    mode: ``nap`` decodes the canvas ``[H1 R1]…[Hm Rm][HS S]`` (every step commits tokens in
    every unfinished think block); ``ao`` (global order by the policy's score), ``ar_order``
    (leftmost masked first) and ``random`` decode one plain answer region of ``answer_len``.
    blocks, block_len, summary_len: the canvas (m think blocks of ``block_len`` body tokens each,
    headers not counted). Budget: ``tokens_per_step`` commits that many tokens per block per
    step; ``steps`` is the step budget of the whole generation (think and summary phases split it
    in proportion to their lengths when the summary comes after). Give either or both; neither
    means one token per block per step. schedule: how ``steps`` spreads a block's tokens over its
    steps: ``uniform`` (LLaDA) or ``linspace`` (Dream). policy: which masked positions a block
    commits: highest ``confidence`` (max probability), ``margin`` (top-1 minus top-2) or
    ``entropy`` (negative entropy) first; ``threshold`` (every position whose confidence reaches
    ``threshold``, always the top-1) or ``factor`` (Fast-dLLM: the n-th best if its confidence
    >= 1 - factor / (n + 1), always the top-1). With ``steps`` set, the rule policies also commit
    enough to finish within the budget. temperature: 0 is greedy; above 0 samples by Gumbel-max
    in float64. seed: request r of a batch uses ``seed + r``; random streams are keyed by (that
    seed, block, step), never by rank or batch position. attention: ``isolated`` (prompt KV cached
    exactly, blocks independent) or ``canvas`` (full bidirectional, no cache; one device).
    summary: decoded ``after`` the think blocks or ``concurrent`` with them.
    eos_closes_block: an EOS committed in a think block, the summary or the answer region of the
    other modes fills every position after it in that region with EOS; the region closes once
    nothing before it is masked. bar_eos_in_blocks: EOS is never chosen in
    think blocks; summary_min_tokens: EOS is never chosen in the summary's first n positions.
    chat_template: apply the tokenizer's chat template to string prompts.

    Under torchrun (several ranks; ``isolated`` only) the think blocks are spread over the ranks.
    prompt_kv: how each rank gets the prompt KV (``auto`` picks by a cost model, see
    ``paradec.distributed.prompt_kv``); gather: what the summary owner (rank 0) collects at
    summary time, the blocks' ``tokens`` (it recomputes their KV) or their ``kv``; results_on:
    ``rank0`` (other ranks get None) or ``all``; rank_timeout_s: how long a rank waits for one
    that stopped responding before failing with its name.
    """

    mode: str = "nap"
    blocks: int = 4
    block_len: int = 64
    summary_len: int = 64
    answer_len: int = 128
    steps: int | None = None
    tokens_per_step: int | None = None
    schedule: str = "uniform"
    policy: str = "confidence"
    threshold: float = 0.9
    factor: float = 1.0
    temperature: float = 0.0
    seed: int = 0
    attention: str = "isolated"
    summary: str = "after"
    eos_closes_block: bool = True
    bar_eos_in_blocks: bool = False
    summary_min_tokens: int = 0
    chat_template: bool = True
    prompt_kv: str = "auto"
    gather: str = "tokens"
    results_on: str = "rank0"
    rank_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        _choice("policy", self.policy, POLICIES)
        _choice("attention", self.attention, ATTENTIONS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("summary", self.summary, SUMMARY_ORDERS)
        _choice("prompt_kv", self.prompt_kv, PROMPT_KV)
        _choice("gather", self.gather, GATHERS)
        _choice("results_on", self.results_on, RESULTS_ON)
        if not (self.rank_timeout_s > 0):
            raise ConfigError(f"rank_timeout_s must be > 0, got {self.rank_timeout_s}")
        for name in ("blocks", "block_len", "summary_len", "answer_len"):
            _positive(name, getattr(self, name))
        for name in ("steps", "tokens_per_step"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not (0.0 < self.threshold <= 1.0):
            raise ConfigError(f"threshold must lie in (0, 1], got {self.threshold}")
        if not (self.factor > 0.0):
            raise ConfigError(f"factor must be > 0, got {self.factor}")
        if not (self.temperature >= 0.0):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not (0 <= self.summary_min_tokens <= self.summary_len):
            raise ConfigError(f"summary_min_tokens must lie in [0, summary_len={self.summary_len}], got {self.summary_min_tokens}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        if self.policy in RULE_POLICIES and self.tokens_per_step is not None:
            raise ConfigError(
                f"tokens_per_step applies to the top-k policies (confidence, margin, entropy); "
                f"policy={self.policy!r} commits by its rule (give steps to bound the steps)"
            )
        budgets = self.phase_budgets()
        if self.steps is not None and self.tokens_per_step is not None:
            for name, length, steps in budgets:
                needed = -(-length // self.tokens_per_step)
                if steps < needed:
                    raise ConfigError(
                        f"steps={self.steps} cannot commit the canvas at tokens_per_step={self.tokens_per_step}: "
                        f"the {name} ({length} tokens) needs {needed} steps but gets {steps}"
                    )

    @classmethod
    def build(cls, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        return replace(config or cls(), **overrides)

    @property
    def canvas(self) -> bool:
        return self.mode == "nap"

    def phase_budgets(self) -> list[tuple[str, int, int | None]]:
        """(phase, body tokens per block, steps or None) for each phase, in order."""
        if not self.canvas:
            return [("answer", self.answer_len, self.steps)]
        if self.summary == "concurrent":
            return [("canvas", max(self.block_len, self.summary_len), self.steps)]
        if self.steps is None:
            return [("think blocks", self.block_len, None), ("summary", self.summary_len, None)]
        if self.steps < 2:
            raise ConfigError(f"steps must be >= 2 when the summary decodes after the think blocks, got {self.steps}")
        think = round(self.steps * self.block_len / (self.block_len + self.summary_len))
        think = min(max(think, 1), self.steps - 1)
        return [("think blocks", self.block_len, think), ("summary", self.summary_len, self.steps - think)]


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
