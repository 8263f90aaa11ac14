"""``GenerationConfig``: the flat config users write, and how overrides apply to it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from functools import cached_property

from paradec.decoding import policies
from paradec.config.params import NEEDS, DistributedSettings, RequestParams, RuntimeSettings, normalise_request
from paradec.config.validation import validate
from paradec.errors import ConfigError


@dataclass(frozen=True)
class GenerationConfig(DistributedSettings, RuntimeSettings, RequestParams):
    """How to decode: every field of the three parts, flat — the request's decoding parameters
    (``RequestParams``: mode, canvas, budgets, policy, sampling, EOS rules, Hugging Face habits),
    this process's runtime settings (``RuntimeSettings``: windows, cache, CUDA graphs) and the
    distributed settings (``DistributedSettings``: prompt KV, gather, results, rank timeout), in
    that order. Each part's docstring says what its fields do; ``config.request``,
    ``config.runtime`` and ``config.distributed`` are the parts of this config.

    Made, it has passed ``paradec.config.validate`` (every check that needs no context); every
    bad value is refused before any work starts, with the field's name and its allowed range in
    the message. ``GenerationConfig.build(config, **overrides)`` applies overrides the way
    ``paradec.generate(**settings)`` does (dependent settings follow their condition).
    """

    def __post_init__(self) -> None:
        normalise_request(self)
        validate(self)

    @classmethod
    def build(cls, config: GenerationConfig | None = None, **overrides) -> GenerationConfig:
        """``config`` (or the defaults) with ``overrides`` applied; unknown names are refused."""
        unknown = sorted(set(overrides) - set(DEFAULTS))
        if unknown:
            hints = "".join(f"; {name}: {FOREIGN[name]}" for name in unknown if name in FOREIGN)
            raise ConfigError(f"unknown generation settings {unknown}{hints}; known: {sorted(DEFAULTS)}")
        base = config or cls()
        plain = {name: plain_value(value) for name, value in overrides.items()}
        return replace(base, **_resolve_overrides(base, plain))

    @cached_property
    def request(self) -> RequestParams:
        """This config's per-request decoding parameters."""
        return RequestParams(**_values(self, RequestParams))

    @cached_property
    def runtime(self) -> RuntimeSettings:
        """This config's runtime settings."""
        return RuntimeSettings(**_values(self, RuntimeSettings))

    @cached_property
    def distributed(self) -> DistributedSettings:
        """This config's distributed settings."""
        return DistributedSettings(**_values(self, DistributedSettings))

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

    @property
    def refreshes_partially(self) -> bool:
        """Whether a dual-cache refresh after a phase's first window is partial: ``partial_refresh``,
        or when None, ``nap`` windows with the dual cache and no ``refresh_every`` (with
        Fast-dLLM's rules a step body refreshes partially only when ``partial_refresh`` is True)."""
        if self.partial_refresh is not None:
            return self.partial_refresh
        return self.mode == "nap" and self.cache_mode == "dual" and self.refresh_every is None


DEFAULTS = {f.name: f.default for f in fields(GenerationConfig)}
# transformers', LLaDA's, Dream's and Fast-dLLM's names for what paradec spells otherwise (README's table)
_COMPAT = "paradec.compat.{} takes {}'s arguments as they are"  # module.function, runtime
_DREAM, _LLADA = _COMPAT.format("dream.diffusion_generate", "Dream"), _COMPAT.format("llada.generate", "LLaDA")
FOREIGN = {
    "do_sample": "paradec samples where temperature > 0 (do_sample=False is temperature=0)",
    "stop_strings": "give stop=",
    "max_length": "max_new_tokens bounds the answer; blocks and block_len set the rest of the canvas",
    "return_dict_in_generate": "a result carries every field",
    "output_history": "result.trace holds the step that committed each position; " + _DREAM,
    "pad_token_id": "read from the checkpoint's tokenizer (pass attention_mask= with padded rows)",
    "eos_token_id": "read from the checkpoint",
    "generation_config": "config= takes a paradec GenerationConfig or a mapping of settings",
    "gen_length": "max_new_tokens (and mode='block', block_len); " + _LLADA,
    "block_length": "mode='block', block_len=; " + _COMPAT.format("fastdllm.generate", "Fast-dLLM"),
    "remasking": "policy='confidence' (low_confidence), mode='random' (random); " + _LLADA,
    "alg": "policy='confidence' / 'margin' / 'entropy' (maskgit_plus / topk_margin / entropy), mode='random' "
           "(origin); " + _DREAM,
    "alg_temp": "rank_temperature=",
    "eps": "schedule='linspace'",
    "use_cache": "cache='prefix' or 'dual' (with mode='block' or a nap window)",
    "dual_cache": "cache='dual'",
    "cfg_scale": _LLADA,
    "mask_id": "read from the checkpoint",
    "mask_token_id": "read from the checkpoint",
}
# settings an override drops back to their default when it turns their condition off
_DROPPED_WITH = {
    "threshold": lambda c: c["policy"] == "threshold",
    "factor": lambda c: c["policy"] == "factor",
    "top_k": lambda c: c["temperature"] > 0,
    "top_p": lambda c: c["temperature"] > 0,
    "score_on": lambda c: c["temperature"] > 0,
    "rank_temperature": lambda c: c["temperature"] > 0 and c["policy"] in policies.names(by_score=True)
    and c["mode"] not in ("ar_order", "random"),
}
_PARTS = (("Per-request decoding parameters (paradec.config.RequestParams)", RequestParams),
          ("Runtime settings (paradec.config.RuntimeSettings)", RuntimeSettings),
          ("Distributed settings (paradec.config.DistributedSettings)", DistributedSettings))


def _values(config: GenerationConfig, part: type) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(part)}


def plain_value(value):
    """A numpy scalar or a 0-d tensor (``steps=np.int64(128)``, as LLaDA's and transformers' callers
    pass them) as the Python number it holds; anything else as it is."""
    if type(value).__module__.split(".")[0] in ("numpy", "torch") and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def merged_settings(config: Mapping, overrides: Mapping) -> dict:
    """A mapping of settings given as ``config`` with keyword ``overrides``; a name in both is
    refused (which one was meant is not for paradec to guess)."""
    both = sorted(set(config) & set(overrides))
    if both:
        raise ConfigError(f"{both} given both in config and as keyword arguments; give each once")
    return {**config, **overrides}


def resolved_policy(policy: str, overrides: Mapping) -> str:
    """The policy a config of ``policy`` decodes with under ``overrides``: theirs, else the one a
    ``threshold`` or ``factor`` given without it implies (threshold first), else ``policy``."""
    implied = [name for name in ("threshold", "factor") if name in overrides and policy != name]
    return overrides.get("policy", implied[0] if implied else policy)


def _resolve_overrides(base: GenerationConfig, overrides: dict) -> dict:
    """What ``build`` applies: ``threshold``/``factor`` given without ``policy`` imply their policy,
    and given with another policy are refused (whatever their value: one equal to its default
    would otherwise be dropped unseen), but for the unused default of a whole config's dump;
    ``max_new_tokens`` sets the answer text's region of the resulting mode (and a region length
    given later drops it); settings whose condition the overrides turn off drop to defaults."""
    # a config's every setting (a dump: asdict(config)) names policy, threshold and factor: the one
    # its policy leaves unused is at its default there, not given
    whole = {"policy", "threshold", "factor"} <= set(overrides)
    policy = overrides["policy"] = resolved_policy(base.policy, overrides)
    for name in ("threshold", "factor"):
        if name in overrides and policy != name and not (whole and overrides[name] == DEFAULTS[name]):
            raise ConfigError(f"{name}={overrides[name]!r} {NEEDS[name]}, got policy={policy!r}")
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
    merged = {name: getattr(base, name) for name in DEFAULTS} | overrides
    for name, applies in _DROPPED_WITH.items():
        if name not in overrides and merged[name] != DEFAULTS[name] and not applies(merged):
            overrides[name] = DEFAULTS[name]
    return overrides


def settings_help() -> str:
    """One line per setting — name, type, default, what it does — from the fields' own help,
    under a heading per part."""
    lines = []
    for heading, part in _PARTS:
        lines.append(f"  {heading}:")
        for f in fields(part):
            lines.append(f"    {f.name} ({f.type}, default {f.default!r}): {f.metadata['help']}")
    return "\n".join(lines)
