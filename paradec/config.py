"""The validated generation config. Every bad value is refused before any work starts, with
the field's name and its allowed range in the message."""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace

from paradec.errors import ConfigError
from paradec.ops.scoring import SCORE_ON

MODES = ("nap", "ao", "ar_order", "random", "block")
POLICIES = ("confidence", "margin", "entropy", "threshold", "factor")
RULE_POLICIES = ("threshold", "factor")  # commit by a rule, not a fixed count
ATTENTIONS = ("isolated", "canvas")
SCHEDULES = ("uniform", "linspace")
SUMMARY_ORDERS = ("after", "concurrent")
PROMPT_KV = ("auto", "broadcast", "recompute")
GATHERS = ("tokens", "kv")
RESULTS_ON = ("rank0", "all")
CACHES = ("none", "prefix", "dual")
TOPK_POLICIES = ("confidence", "margin", "entropy")  # rank by a score; rank_temperature applies to them


def _setting(default, help: str):
    """A config field with its one-line help, which the CLI flags and generate()'s docstring show."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode.

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
    result can differ from ``cache="none"``, which is exact. cuda_graphs: on a CUDA device, replay the steps of a
    window as CUDA graphs (captured once per shape, no host synchronisation inside a step; the
    host checks for completion every few steps) where a step has static shapes: greedy
    (temperature 0), the forward reusing a cache (``isolated`` attention, or a windowed
    ``prefix``/``dual`` cache), no ``random`` order. Elsewhere steps run eagerly.

    Under torchrun (several ranks; ``isolated`` only) the think blocks are spread over the ranks.
    prompt_kv: how each rank gets the prompt KV (``auto`` picks by a cost model, see
    ``paradec.distributed.prompt_kv``); gather: what the summary owner (rank 0) collects at
    summary time, the blocks' ``tokens`` (it recomputes their KV) or their ``kv``; results_on:
    ``rank0`` (other ranks get None) or ``all``; rank_timeout_s: how long a rank may make no
    progress (no step, no phase) while the others wait for it at a sync point before the job ends
    with its name (a live but stuck rank is ended too).
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
    window: int | None = _setting(None, "nap: decode each block this many body tokens at a time (None: the whole block)")
    cache: str | None = _setting(None, "windowed decoding's KV reuse: none, prefix or dual (default dual when windowed)")
    refresh_every: int | None = _setting(None, "windowed cache: recompute the reused KV every n steps (None: at each window's first step only)")
    cuda_graphs: bool = _setting(True, "on CUDA, replay static-shape steps as CUDA graphs")
    prompt_kv: str = _setting("auto", "torchrun: how each rank gets the prompt KV: auto (cost model), broadcast or recompute")
    gather: str = _setting("tokens", "torchrun: what rank 0 collects at summary time: the blocks' tokens or their kv")
    results_on: str = _setting("rank0", "torchrun: results on rank0 only (None elsewhere) or on all ranks")
    rank_timeout_s: float = _setting(60.0, "torchrun: seconds a rank may go without progress while the others wait for it; then the job ends naming it")

    def __post_init__(self) -> None:
        self._normalise()
        self._check_types()
        self._apply_max_new_tokens()
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
        for name in ("steps", "tokens_per_step", "window", "refresh_every"):
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
        self._check_sampling()
        self._check_dependents()
        if self.policy in RULE_POLICIES and self.tokens_per_step is not None:
            raise ConfigError(
                f"tokens_per_step applies to the top-k policies (confidence, margin, entropy); "
                f"policy={self.policy!r} commits by its rule (give steps to bound the steps)"
            )
        self._check_windows()
        budgets = self.phase_budgets()
        for name, length, steps in budgets:
            windows = window_lengths(length, self.window_len)
            if steps is not None and steps < len(windows):
                raise ConfigError(
                    f"steps={self.steps} is too few for the {name}: its {len(windows)} windows of "
                    f"{self.window_len} tokens need at least one step each, but the {name} gets {steps}"
                )
            if steps is not None and self.tokens_per_step is not None:
                needed = sum(-(-w // self.tokens_per_step) for w in windows)
                if steps < needed:
                    raise ConfigError(
                        f"steps={self.steps} cannot commit the canvas at tokens_per_step={self.tokens_per_step}: "
                        f"the {name} ({length} tokens) needs {needed} steps but gets {steps}"
                    )

    def _normalise(self) -> None:
        """Off values to None (top_k 0, top_p 1, an empty stop list); stop to a tuple of strings."""
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen
        if self.top_k == 0 and not isinstance(self.top_k, bool):
            set_("top_k", None)
        if self.top_p == 1 and not isinstance(self.top_p, bool):
            set_("top_p", None)
        stop = self.stop
        if stop is None:
            return
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        if any(s == "" for s in stop):
            raise ConfigError("stop strings must not be empty (an empty string matches everywhere)")
        set_("stop", tuple(dict.fromkeys(stop)) or None)

    def _apply_max_new_tokens(self) -> None:
        """max_new_tokens sets the answer text's region: answer_len (summary_len in nap). A
        region length that differs from it and from its default was given too: refused."""
        if self.max_new_tokens is None:
            return
        _positive("max_new_tokens", self.max_new_tokens)
        target = "summary_len" if self.mode == "nap" else "answer_len"
        current = getattr(self, target)
        if current != self.max_new_tokens:
            if current != _DEFAULTS[target]:
                raise ConfigError(
                    f"max_new_tokens={self.max_new_tokens} and {target}={current} disagree: in mode={self.mode!r} "
                    f"max_new_tokens is the {target}; give one of them"
                )
            object.__setattr__(self, target, self.max_new_tokens)

    def _check_sampling(self) -> None:
        _choice("score_on", self.score_on, SCORE_ON)
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be an int >= 1 (or 0/None: off), got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ConfigError(f"top_p must lie in (0, 1] (1/None: off), got {self.top_p!r}")
        if not (self.rank_temperature >= 0.0):
            raise ConfigError(f"rank_temperature must be >= 0, got {self.rank_temperature}")
        _positive("num_return_sequences", self.num_return_sequences)
        greedy = self.temperature == 0
        for name in ("top_k", "top_p"):
            if getattr(self, name) is not None and greedy:
                raise ConfigError(f"{name}={getattr(self, name)} restricts sampling: it needs temperature > 0 "
                                  f"(at temperature 0 decoding is greedy and {name} would change nothing)")
        if self.score_on == "sampling" and greedy:
            raise ConfigError("score_on='sampling' scores on the sampling distribution: it needs temperature > 0 "
                              "(at temperature 0 it is the model's, score_on='model')")
        if self.rank_temperature > 0:
            if self.mode in ("ar_order", "random"):
                raise ConfigError(f"rank_temperature ranks by the policy's score: mode={self.mode!r} does not rank "
                                  f"by it (use nap, ao or block)")
            if self.policy not in TOPK_POLICIES:
                raise ConfigError(f"rank_temperature applies to the top-k policies {list(TOPK_POLICIES)}, got "
                                  f"policy={self.policy!r} (a rule commits by its threshold, not by a ranking)")
            if greedy:
                raise ConfigError("rank_temperature draws its ranking noise from the sampling stream, which greedy "
                                  "decoding does not draw: it needs temperature > 0 for now")
        if self.num_return_sequences > 1 and greedy and self.mode != "random" and self.rank_temperature == 0:
            raise ConfigError(
                f"num_return_sequences={self.num_return_sequences} would return {self.num_return_sequences} identical "
                f"greedy results: give temperature > 0 (or mode='random', or rank_temperature > 0)"
            )

    def _check_dependents(self) -> None:
        """A setting that only applies under another is refused when set without it."""
        for name, applies in _DEPENDENTS.items():
            value = getattr(self, name)
            if value != _DEFAULTS[name] and not applies(self):
                raise ConfigError(f"{name}={value!r} {_NEEDS[name]}, got {_condition_text(name, self)}")

    def _check_types(self) -> None:
        """Each field holds its declared type (an int where a float is declared is fine; a bool
        is never a number) and every float is finite."""
        for f in fields(self):
            value, kinds = getattr(self, f.name), str(f.type).split(" | ")
            if value is None and "None" in kinds or f.name == "stop":  # stop: checked by _normalise
                continue
            ok = {"int": isinstance(value, int) and not isinstance(value, bool),
                  "float": isinstance(value, (int, float)) and not isinstance(value, bool),
                  "str": isinstance(value, str), "bool": isinstance(value, bool)}
            if not any(ok.get(k, False) for k in kinds):
                wanted = " or ".join({"None": "None", "int": "an int"}.get(k, f"a {k}") for k in kinds)
                raise ConfigError(f"{f.name} must be {wanted}, got {value!r} ({type(value).__name__})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")

    def _check_windows(self) -> None:
        if self.window is not None and self.mode != "nap":
            hint = " (block mode's window is block_len)" if self.mode == "block" else ""
            raise ConfigError(f"window applies to mode='nap' only{hint}, got mode={self.mode!r}")
        if self.window is not None and self.summary == "concurrent":
            raise ConfigError("window needs summary='after' (a concurrent summary attends to whole blocks)")
        if self.cache is not None:
            _choice("cache", self.cache, CACHES)
            if self.window_len is None:
                raise ConfigError(
                    f"cache={self.cache!r} applies to windowed decoding (mode='block', or mode='nap' with window set)"
                )
        if self.refresh_every is not None and self.cache_mode in (None, "none"):
            raise ConfigError("refresh_every applies to a windowed cache (cache='prefix' or 'dual')")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")

    @classmethod
    def build(cls, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        base = config or cls()
        return replace(base, **_resolve_overrides(base, dict(overrides)))

    @property
    def canvas(self) -> bool:
        return self.mode == "nap"

    @property
    def window_len(self) -> int | None:
        """Tokens a group decodes at a time; None: its whole body."""
        return self.block_len if self.mode == "block" else self.window

    @property
    def cache_mode(self) -> str | None:
        """The windowed cache in use (``dual`` unless set), None when not windowed."""
        if self.window_len is None:
            return None
        return self.cache or "dual"

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


_DEFAULTS = {f.name: f.default for f in fields(GenerationConfig)}

# dependent setting -> when it applies; what the refusal says it needs
_DEPENDENTS = {
    "threshold": lambda c: c.policy == "threshold",
    "factor": lambda c: c.policy == "factor",
}
_NEEDS = {
    "threshold": "applies to policy='threshold' (generate(threshold=...) without policy implies it)",
    "factor": "applies to policy='factor' (generate(factor=...) without policy implies it)",
}
# settings an override drops back to their default when it turns their condition off
_DROPPED_WITH = {
    "threshold": lambda c: c["policy"] == "threshold",
    "factor": lambda c: c["policy"] == "factor",
    "top_k": lambda c: c["temperature"] > 0,
    "top_p": lambda c: c["temperature"] > 0,
    "score_on": lambda c: c["temperature"] > 0,
    "rank_temperature": lambda c: c["temperature"] > 0 and c["policy"] in TOPK_POLICIES
    and c["mode"] not in ("ar_order", "random"),
}


def _condition_text(name: str, config: GenerationConfig) -> str:
    return f"policy={config.policy!r}"


def _resolve_overrides(base: GenerationConfig, overrides: dict) -> dict:
    """What ``build`` applies: ``threshold``/``factor`` given without ``policy`` imply their policy;
    ``max_new_tokens`` sets the answer text's region of the resulting mode (and a region length
    given later drops it); settings whose condition the overrides turn off drop to defaults."""
    for name in ("threshold", "factor"):
        if name in overrides and "policy" not in overrides and base.policy != name:
            overrides["policy"] = name
    mode = overrides.get("mode", base.mode)
    target = "summary_len" if mode == "nap" else "answer_len"
    given = overrides.get("max_new_tokens", base.max_new_tokens)
    if target in overrides and "max_new_tokens" in overrides and overrides["max_new_tokens"] is not None \
            and overrides[target] != overrides["max_new_tokens"]:
        raise ConfigError(f"max_new_tokens={overrides['max_new_tokens']} and {target}={overrides[target]} disagree: "
                          f"in mode={mode!r} max_new_tokens is the {target}; give one of them")
    if target in overrides and "max_new_tokens" not in overrides:
        overrides["max_new_tokens"] = None  # the region's length given later wins
    elif given is not None:
        overrides[target] = given
    merged = {f.name: getattr(base, f.name) for f in fields(base)} | overrides
    for name, applies in _DROPPED_WITH.items():
        if name not in overrides and merged[name] != _DEFAULTS[name] and not applies(merged):
            overrides[name] = _DEFAULTS[name]
    return overrides


def settings_help() -> str:
    """One line per setting — name, type, default, what it does — from the fields' own help."""
    lines = []
    for f in fields(GenerationConfig):
        default = f.default if f.default is not MISSING else None
        lines.append(f"    {f.name} ({f.type}, default {default!r}): {f.metadata['help']}")
    return "\n".join(lines)


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
