"""The three parts of a generation config: what one request asks for (``RequestParams``), how
this process runs its steps (``RuntimeSettings``) and how ranks share a canvas
(``DistributedSettings``). Each part refuses a bad value of its own fields when it is made;
checks across parts, and those that need the canvas, the model or the ranks, are
``paradec.config.validation.validate``'s, which also runs these."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from paradec.config.choices import (ATTENTIONS, CACHES, GATHERS, MODES, PROMPT_KV, RESULTS_ON, SCHEDULES, SCORE_ON,
                                    SUMMARY_ORDERS)
from paradec.decoding import policies
from paradec.errors import ConfigError


def _setting(default, help: str):
    """A config field with its one-line help, which the CLI flags and generate()'s docstring show."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class RequestParams:
    """What one request asks for: what it decodes and how it chooses tokens. Requests batched
    together share these for now (a batch decodes one config).

    mode: ``nap`` decodes the canvas ``[H1 R1]…[Hm Rm][HS S]`` (every step commits tokens in
    every unfinished think block); ``ao`` (global order by the policy's score), ``ar_order``
    (leftmost masked first) and ``random`` decode one plain answer region of ``answer_len``;
    ``block`` decodes that region in semi-autoregressive blocks of ``block_len`` tokens, left to
    right, each by the policy (LLaDA's semi-AR sampler; Fast-dLLM with a cache).
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

    Hugging Face habits. max_new_tokens: the length of the answer text's region — ``answer_len``
    outside ``nap``, ``summary_len`` in ``nap`` (the think blocks keep ``blocks`` x ``block_len``);
    it sets that field (given both, they must agree; a later override of either wins).
    stop: a string or a list of strings; the answer text (and its token ids) is cut before the
    earliest one, and decoding ends early once the committed left-to-right prefix of the answer
    region holds one (one process; see ``paradec.generate``). num_return_sequences: n samples of
    every prompt — the batch is expanded prompt-major, request p·n + i using seed + p·n + i (one
    prompt: sample i uses seed + i); it needs randomness (temperature > 0, ``random`` order or a
    rank temperature). top_k, top_p: restrict the temperature draw to the k most likely tokens /
    the nucleus of mass top_p (transformers' order: temperature, top-k, top-p; in float64, keyed
    as the draw is); they need temperature > 0; the fused score kernel does not filter, so these
    requests are scored by its plain-torch twin. score_on: ``model`` (LLaDA) scores confidence,
    margin and entropy on the model's distribution at temperature 1; ``sampling`` (Dream) on the
    distribution the token is drawn from (temperature, top-k, top-p applied); needs temperature >
    0. rank_temperature (Dream's ``alg_temp``): a top-k policy commits positions drawn without
    replacement with probability softmax(score / rank_temperature) instead of the best first;
    needs a top-k policy, a mode that ranks by it (nap, ao, block) and, for now, temperature > 0
    (its noise comes from the sampling stream).
    Dependent settings: ``threshold`` and ``factor`` apply to their policy only — given to
    ``generate``/``build`` without ``policy`` they imply it, given with another policy (or set on a
    config of another policy) they are refused; an override that turns a setting's condition off
    (``temperature=0`` over a sampled config, another ``policy``) drops the settings that
    depended on it back to their defaults.
    """

    mode: str = _setting("nap", "nap: think blocks + summary canvas; ao / ar_order / random: one answer region decoded by the policy's global order, leftmost first, or at random; block: semi-autoregressive blocks of block_len (LLaDA, Fast-dLLM)")
    blocks: int = _setting(4, "think blocks m of the nap canvas")
    block_len: int = _setting(64, "body tokens of each think block (nap), or of each semi-AR block (block mode)")
    summary_len: int = _setting(64, "body tokens of the summary block (nap)")
    answer_len: int = _setting(128, "tokens of the answer region outside nap")
    steps: int | None = _setting(None, "step budget of the whole generation (None: set by tokens_per_step)")
    tokens_per_step: int | None = _setting(None, "tokens committed per block per step by the top-k policies (None with steps unset: 1)")
    schedule: str = _setting("uniform", "how steps spread a block's tokens: uniform (LLaDA) or linspace (Dream)")
    policy: str = _setting("confidence", "which masked positions commit: confidence, margin, entropy (top-k), threshold or factor (rules)")
    threshold: float = _setting(0.9, "policy=threshold: commit every position whose confidence reaches this, in (0, 1]")
    factor: float = _setting(1.0, "policy=factor (Fast-dLLM): the n-th best commits if its confidence >= 1 - factor / (n + 1); > 0")
    temperature: float = _setting(0.0, "0 is greedy; above 0 samples by Gumbel-max in float64")
    seed: int = _setting(0, "request r of a batch uses seed + r; streams keyed by (seed, block, step)")
    attention: str = _setting("isolated", "isolated: blocks see the prompt and themselves (exact prompt cache, spreadable over ranks); canvas: full bidirectional")
    summary: str = _setting("after", "the summary decodes after the think blocks or concurrent with them")
    eos_closes_block: bool = _setting(True, "an EOS committed in a region fills every position after it with EOS")
    bar_eos_in_blocks: bool = _setting(False, "EOS is never chosen in think blocks")
    summary_min_tokens: int = _setting(0, "EOS is never chosen in the summary's first n positions")
    chat_template: bool = _setting(True, "apply the tokenizer's chat template to string prompts")
    max_new_tokens: int | None = _setting(None, "length of the answer text's region: answer_len outside nap, summary_len in nap (sets it)")
    stop: str | None = _setting(None, "a string or list of strings: the answer text is cut before the earliest (finish_reason 'stop'); decoding ends early where it can")
    num_return_sequences: int = _setting(1, "samples per prompt; request p*n + i uses seed + p*n + i (needs temperature > 0, random order or rank_temperature)")
    top_k: int | None = _setting(None, "sample among the k most likely tokens only (ties at the k-th kept; needs temperature > 0; None or 0: off)")
    top_p: float | None = _setting(None, "sample from the smallest most-likely set of mass top_p, in (0, 1] (needs temperature > 0; None or 1: off)")
    score_on: str = _setting("model", "confidence/margin/entropy from the model's distribution (model, LLaDA) or the sampling one (sampling: temperature, top_k, top_p applied; Dream)")
    rank_temperature: float = _setting(0.0, "Dream's alg_temp: top-k policies draw positions by softmax(score / this) instead of best first; 0: off")

    def __post_init__(self) -> None:
        normalise_request(self)
        check_request(self)

    @property
    def canvas(self) -> bool:
        return self.mode == "nap"

    @property
    def body_tokens(self) -> int:
        """Tokens the request decodes (its canvas's blocks and summary, or its answer), headers
        not counted: known before its layout is built."""
        return self.blocks * self.block_len + self.summary_len if self.canvas else self.answer_len

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


@dataclass(frozen=True)
class RuntimeSettings:
    """How this process runs a request's steps: windows, the KV they reuse, CUDA graphs.

    Windows. ``block`` mode decodes one window (its block) at a time; ``nap`` does so when
    ``window`` is set: every think block (and the summary) decodes its first ``window`` body
    tokens, then the next ``window``, ... all blocks in step (``window=None``: the whole block,
    the exact mode). A phase's ``steps`` are shared by its windows in proportion to their lengths.
    cache: what a windowed step recomputes (default ``dual``): ``none`` forwards what an
    unwindowed step forwards; ``prefix`` forwards the window and the rest of its block after
    it, reusing the KV of what precedes; ``dual`` forwards the window only and reuses the KV of
    everything else. The reused KV is computed by the window's first step, which forwards
    everything (and again every ``refresh_every`` steps when set). Reusing it is
    Fast-dLLM's approximation wherever a cached token attends to the window (always under
    ``canvas`` attention, where the prompt does; inside a think block under ``isolated``): the
    result can differ from ``cache="none"``, which is exact. partial_refresh (``dual`` only): a
    refresh after a phase's first window forwards only that window's and the previous window's
    columns (the ones whose tokens changed since the last refresh) and keeps every other column's
    KV: fewer columns forwarded per committed token (~11 instead of ~15 at the 8B benchmark's
    canvas), one more approximation, with no accuracy cost measured at toy scale
    (benchmarks/RESULTS.md). None (the default) turns it on for ``nap`` windows with the dual
    cache and no ``refresh_every``; block mode, Fast-dLLM's semi-autoregressive baseline, keeps
    its full refresh, as do Fast-dLLM's rules; ``False`` asks for the full refresh.
    delayed_kv (a windowed cache): dKV-Cache's delayed caching inside a window: a step after the
    window's refresh forwards only the window's still-masked columns and those committed at the
    previous step (a shifted model's predecessors of masked columns too); a token committed
    earlier keeps the KV computed one step after its commit until the next refresh. Fewer
    columns per committed token (~0.74x at the 8B benchmark's canvas, windows of 32, k = 4),
    another approximation, off by default: at toy scale its accuracy was within noise at most
    settings but about a point lower at windows of 16, one token a step (benchmarks/RESULTS.md).
    cuda_graphs: on a CUDA device, replay the steps as CUDA graphs (captured once per shape, no
    host synchronisation inside a step; the host checks for completion every few steps); off, or
    on a CPU, the same step body is called.
    batch_invariant: on a GPU, kernels whose rounding does not depend on how many rows share a
    call (``paradec.ops.batch_invariant``), so a request decodes the same batched, alone or
    spread (bf16 costs 1.04-1.40x a step); None: the process's setting
    (``PARADEC_BATCH_INVARIANT=1``); a CPU is unaffected.
    """

    window: int | None = _setting(None, "nap: decode each block this many body tokens at a time (None: the whole block)")
    cache: str | None = _setting(None, "windowed decoding's KV reuse: none, prefix or dual (default dual when windowed)")
    refresh_every: int | None = _setting(None, "windowed cache: recompute the reused KV every n steps (None: at each window's first step only)")
    partial_refresh: bool | None = _setting(None, "dual cache: a refresh after a phase's first window forwards only that window's and the previous window's columns (None: on for mode='nap' without refresh_every, off for block mode)")
    delayed_kv: bool = _setting(False, "windowed cache: a step forwards only the window's masked columns and those committed at the previous step; the others keep their KV until the next refresh (dKV-Cache's delayed caching)")
    cuda_graphs: bool = _setting(True, "on CUDA, replay static-shape steps as CUDA graphs")
    batch_invariant: bool | None = _setting(None, "on a GPU, batch-invariant kernels: a request decodes the same in any batch (None: PARADEC_BATCH_INVARIANT)")

    def __post_init__(self) -> None:
        check_runtime(self)


@dataclass(frozen=True)
class DistributedSettings:
    """How ranks share a canvas under torchrun (several ranks; ``isolated`` only), where the
    think blocks are spread over the ranks.

    prompt_kv: how each rank gets the prompt KV (``auto`` picks by a cost model, see
    ``paradec.distributed.prompt_kv``); gather: what the summary owner (rank 0) collects at
    summary time, the blocks' ``tokens`` (it recomputes their KV) or their ``kv``; results_on:
    ``rank0`` (other ranks get None) or ``all``; rank_timeout_s: how long a rank may make no
    progress (no step, no phase) while the others wait for it at a sync point before the job ends
    with its name (a live but stuck rank is ended too).
    """

    prompt_kv: str = _setting("auto", "torchrun: how each rank gets the prompt KV: auto (cost model), broadcast or recompute")
    gather: str = _setting("tokens", "torchrun: what rank 0 collects at summary time: the blocks' tokens or their kv")
    results_on: str = _setting("rank0", "torchrun: results on rank0 only (None elsewhere) or on all ranks")
    rank_timeout_s: float = _setting(60.0, "torchrun: seconds a rank may go without progress while the others wait for it; then the job ends naming it")

    def __post_init__(self) -> None:
        check_distributed(self)


REQUEST_DEFAULTS = {f.name: f.default for f in fields(RequestParams)}
# dependent setting -> when it applies; what the refusal says it needs
DEPENDENTS = {
    "threshold": lambda c: c.policy == "threshold",
    "factor": lambda c: c.policy == "factor",
}
NEEDS = {
    "threshold": "applies to policy='threshold' (generate(threshold=...) without policy implies it)",
    "factor": "applies to policy='factor' (generate(factor=...) without policy implies it)",
}


def normalise_request(params: RequestParams) -> None:
    """Off values to None (top_k 0, top_p 1, an empty stop list); stop to a tuple of strings;
    max_new_tokens to the answer text's region (answer_len, summary_len in nap). Made in place,
    once, by the constructor (the dataclass is frozen)."""
    set_ = lambda name, value: object.__setattr__(params, name, value)  # noqa: E731 - frozen
    if params.top_k == 0 and not isinstance(params.top_k, bool):
        set_("top_k", None)
    if params.top_p == 1 and not isinstance(params.top_p, bool):
        set_("top_p", None)
    stop = params.stop
    if stop is not None:
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {params.stop!r}")
        if any(s == "" for s in stop):
            raise ConfigError("stop strings must not be empty (an empty string matches everywhere)")
        set_("stop", tuple(dict.fromkeys(stop)) or None)
    if params.max_new_tokens is None:
        return
    _positive("max_new_tokens", params.max_new_tokens)
    target = "summary_len" if params.mode == "nap" else "answer_len"
    current = getattr(params, target)
    if current != params.max_new_tokens:
        if current != REQUEST_DEFAULTS[target]:  # the region's length was given too
            raise ConfigError(
                f"max_new_tokens={params.max_new_tokens} and {target}={current} disagree: in mode={params.mode!r} "
                f"max_new_tokens is the {target}; give one of them"
            )
        set_(target, params.max_new_tokens)


def check_request(params: RequestParams) -> None:
    """Each request parameter in its range, and the request's parameters consistent with each
    other (budgets over block mode's blocks included; nap windows are the runtime's)."""
    check_types(params, RequestParams)
    _choice("mode", params.mode, MODES)
    _choice("policy", params.policy, policies.names())
    _choice("attention", params.attention, ATTENTIONS)
    _choice("schedule", params.schedule, SCHEDULES)
    _choice("summary", params.summary, SUMMARY_ORDERS)
    for name in ("blocks", "block_len", "summary_len", "answer_len"):
        _positive(name, getattr(params, name))
    for name in ("steps", "tokens_per_step"):
        if getattr(params, name) is not None:
            _positive(name, getattr(params, name))
    if not (0.0 < params.threshold <= 1.0):
        raise ConfigError(f"threshold must lie in (0, 1], got {params.threshold}")
    if not (params.factor > 0.0):
        raise ConfigError(f"factor must be > 0, got {params.factor}")
    if not (params.temperature >= 0.0):
        raise ConfigError(f"temperature must be >= 0, got {params.temperature}")
    if not (0 <= params.summary_min_tokens <= params.summary_len):
        raise ConfigError(f"summary_min_tokens must lie in [0, summary_len={params.summary_len}], "
                          f"got {params.summary_min_tokens}")
    if not 0 <= params.seed < 2**63:  # the samplers' keys are int64
        raise ConfigError(f"seed must be an int in [0, 2**63), got {params.seed!r}")
    _check_sampling(params)
    for name, applies in DEPENDENTS.items():
        value = getattr(params, name)
        if value != REQUEST_DEFAULTS[name] and not applies(params):
            raise ConfigError(f"{name}={value!r} {NEEDS[name]}, got policy={params.policy!r}")
    if params.policy in policies.names(rule=True) and params.tokens_per_step is not None:
        raise ConfigError(
            f"tokens_per_step applies to the top-k policies (confidence, margin, entropy); "
            f"policy={params.policy!r} commits by its rule (give steps to bound the steps)"
        )
    check_budgets(params, params.block_len if params.mode == "block" else None)


def check_budgets(params: RequestParams, window_len: int | None) -> None:
    """Every phase's steps can commit its blocks decoded in windows of ``window_len`` tokens
    (None: whole): at least one step a window, and enough at ``tokens_per_step``."""
    for name, length, steps in params.phase_budgets():
        if steps is None:
            continue
        windows = window_lengths(length, window_len)
        if steps < len(windows):
            raise ConfigError(
                f"steps={params.steps} is too few for the {name}: its {len(windows)} windows of "
                f"{window_len} tokens need at least one step each, but the {name} gets {steps}"
            )
        if params.tokens_per_step is not None:
            needed = sum(-(-w // params.tokens_per_step) for w in windows)
            if steps < needed:
                raise ConfigError(
                    f"steps={params.steps} cannot commit the canvas at tokens_per_step={params.tokens_per_step}: "
                    f"the {name} ({length} tokens) needs {needed} steps but gets {steps}"
                )


def check_runtime(settings: RuntimeSettings) -> None:
    check_types(settings, RuntimeSettings)
    for name in ("window", "refresh_every"):
        if getattr(settings, name) is not None:
            _positive(name, getattr(settings, name))
    if settings.cache is not None:
        _choice("cache", settings.cache, CACHES)


def check_distributed(settings: DistributedSettings) -> None:
    check_types(settings, DistributedSettings)
    _choice("prompt_kv", settings.prompt_kv, PROMPT_KV)
    _choice("gather", settings.gather, GATHERS)
    _choice("results_on", settings.results_on, RESULTS_ON)
    if not (settings.rank_timeout_s > 0):
        raise ConfigError(f"rank_timeout_s must be > 0, got {settings.rank_timeout_s}")


def _check_sampling(params: RequestParams) -> None:
    _choice("score_on", params.score_on, SCORE_ON)
    if params.top_k is not None and params.top_k < 1:
        raise ConfigError(f"top_k must be an int >= 1 (or 0/None: off), got {params.top_k!r}")
    if params.top_p is not None and not (0.0 < params.top_p <= 1.0):
        raise ConfigError(f"top_p must lie in (0, 1] (1/None: off), got {params.top_p!r}")
    if not (params.rank_temperature >= 0.0):
        raise ConfigError(f"rank_temperature must be >= 0, got {params.rank_temperature}")
    _positive("num_return_sequences", params.num_return_sequences)
    greedy = params.temperature == 0
    for name in ("top_k", "top_p"):
        if getattr(params, name) is not None and greedy:
            raise ConfigError(f"{name}={getattr(params, name)} restricts sampling: it needs temperature > 0 "
                              f"(at temperature 0 decoding is greedy and {name} would change nothing)")
    if params.score_on == "sampling" and greedy:
        raise ConfigError("score_on='sampling' scores on the sampling distribution: it needs temperature > 0 "
                          "(at temperature 0 it is the model's, score_on='model')")
    if params.rank_temperature > 0:
        if params.mode in ("ar_order", "random"):
            raise ConfigError(f"rank_temperature ranks by the policy's score: mode={params.mode!r} does not rank "
                              f"by it (use nap, ao or block)")
        if params.policy not in policies.names(by_score=True):
            raise ConfigError(f"rank_temperature applies to the top-k policies {list(policies.names(by_score=True))}, got "
                              f"policy={params.policy!r} (a rule commits by its threshold, not by a ranking)")
        if greedy:
            raise ConfigError("rank_temperature draws its ranking noise from the sampling stream, which greedy "
                              "decoding does not draw: it needs temperature > 0 for now")
    if params.num_return_sequences > 1 and greedy and params.mode != "random" and params.rank_temperature == 0:
        raise ConfigError(
            f"num_return_sequences={params.num_return_sequences} would return {params.num_return_sequences} "
            f"identical greedy results: give temperature > 0 (or mode='random', or rank_temperature > 0)"
        )


def check_types(obj, part: type) -> None:
    """Each of ``part``'s fields holds its declared type on ``obj`` (an int where a float is
    declared is fine; a bool is never a number) and every float is finite. ``stop`` is checked
    by ``normalise_request``."""
    for f in fields(part):
        value, kinds = getattr(obj, f.name), str(f.type).split(" | ")
        if value is None and "None" in kinds or f.name == "stop":
            continue
        ok = {"int": isinstance(value, int) and not isinstance(value, bool),
              "float": isinstance(value, (int, float)) and not isinstance(value, bool),
              "str": isinstance(value, str), "bool": isinstance(value, bool)}
        if not any(ok.get(k, False) for k in kinds):
            wanted = " or ".join({"None": "None", "int": "an int"}.get(k, f"a {k}") for k in kinds)
            raise ConfigError(f"{f.name} must be {wanted}, got {value!r} ({type(value).__name__})")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number, got {value!r}")


def window_lengths(length: int, window: int | None) -> list[int]:
    """The windows a body of ``length`` tokens decodes in, in order (the last may be shorter)."""
    if window is None or window >= length:
        return [length]
    full, rest = divmod(length, window)
    return [window] * full + ([rest] if rest else [])


def _choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
