"""Dream's ``diffusion_generate`` on paradec's engine.

``diffusion_generate(model, inputs, max_new_tokens=..., steps=..., temperature=..., top_p=...,
top_k=..., alg=..., alg_temp=..., output_history=..., return_dict_in_generate=...)`` takes
Dream's arguments, names and defaults (``DreamGenerationConfig``; a ``generation_config`` object
or dict is read for the same names, keyword arguments win) and returns what Dream's returns: the
sequences ``[B * num_return_sequences, prompt + max_new_tokens]`` (the inputs, padding included,
then the generated tokens), or with ``return_dict_in_generate`` a ``DreamModelOutput`` with
``.sequences`` and ``.history`` (with ``output_history``: the sequences after each of the
``steps`` steps, as Dream's loop appends them; a step after paradec finished repeats the final
sequences, as Dream's steps with nothing left masked do).

The mapping (one plain answer region of ``max_new_tokens`` tokens, Dream's ``linspace``
schedule over ``steps``, full bidirectional attention over prompt and answer, no EOS filling):

- ``alg="maskgit_plus"`` / ``"topk_margin"`` / ``"entropy"``: ``mode="ao"`` with policy
  ``confidence`` / ``margin`` / ``entropy``; ``alg_temp`` is ``rank_temperature`` (positions drawn
  by softmax(score / alg_temp) without replacement instead of the best first).
- ``alg="origin"``: ``mode="random"``: positions in a random order. Dream unmasks each masked
  position with probability 1 - s/t, a binomial count; paradec commits that expectation's floor
  (at least one) per step.
- ``temperature``, ``top_p``, ``top_k``: the same draw (temperature, then top-p/top-k, float64
  Gumbel-max); with temperature > 0 scores come from the sampling distribution
  (``score_on="sampling"``), as Dream's do.
- ``attention_mask``: left padding only (Dream's convention); each row decodes after its own
  tokens, with positions counted from its first real token (as Dream's ``tok_idx``).
- Randomness: Dream draws from torch's global generator; here ``seed`` (None: drawn from
  torch's global generator, so ``torch.manual_seed`` makes a call repeatable) keys paradec's
  streams, sample i of prompt b using seed + b * n + i.

Where the engine differs from Dream's loop: every step commits at least one token (Dream's
``int(...)`` may commit none at a step), ties rank by position, and the mask id is never drawn.
Refused by name, never ignored: ``eps`` other than 1e-3 (the schedule's fixed end point),
``generation_tokens_hook_func`` / ``generation_logits_hook_func``, a ``mask_token_id`` other than
the checkpoint's, ``top_p``/``top_k`` at temperature 0 (Dream uses them there to reshape its
confidence only), ``alg_temp`` with ``origin`` or at temperature 0 (paradec draws its ranking
noise from the sampling stream), right padding, unknown arguments, and mask tokens inside
the inputs.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

import paradec
from paradec.decoding.schedule import LINSPACE_EPS
from paradec.compat import left_padded_prompts
from paradec.errors import ConfigError, InputError

ALGS = {"origin": None, "maskgit_plus": "confidence", "topk_margin": "margin", "entropy": "entropy"}
DEFAULTS = {  # DreamGenerationConfig's defaults
    "temperature": 0.0, "top_p": None, "top_k": None, "max_length": 20, "max_new_tokens": None, "eps": 1e-3,
    "steps": 512, "alg": "origin", "alg_temp": None, "num_return_sequences": 1, "return_dict_in_generate": False,
    "output_history": False, "mask_token_id": None, "pad_token_id": None, "bos_token_id": None,
    "eos_token_id": None,
}
_HOOKS = ("generation_tokens_hook_func", "generation_logits_hook_func")


@dataclass
class DreamModelOutput:
    """What Dream's ``diffusion_generate`` returns with ``return_dict_in_generate=True``."""

    sequences: torch.Tensor  # [B * n, prompt + max_new_tokens]
    history: list[torch.Tensor] | None = None  # one [B * n, prompt + max_new_tokens] per step

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return tuple(v for v in (self.sequences, self.history) if v is not None)[key]

    def __repr__(self) -> str:
        history = None if self.history is None else f"<{len(self.history)} steps>"
        return f"DreamModelOutput(sequences=<{list(self.sequences.shape)}>, history={history})"


def diffusion_generate(model, inputs: torch.Tensor | None = None, generation_config=None, *,
                       attention_mask: torch.Tensor | None = None, seed: int | None = None, **kwargs):
    """Dream's ``model.diffusion_generate(inputs, ...)`` for a paradec model (``paradec.load``).

    inputs: token ids ``[B, L]`` (a 1-D tensor is one row); attention_mask: ``[B, L]``, left
    padding. Keyword arguments (Dream's, with its defaults): max_new_tokens (None: max_length -
    L, or 20 new tokens when max_length is left at 20), max_length (20), steps (512),
    temperature (0.0), top_p (None), top_k (None), eps (1e-3), alg ("origin"; "maskgit_plus",
    "topk_margin", "entropy"), alg_temp (None), num_return_sequences (1), output_history
    (False), return_dict_in_generate (False), mask_token_id / pad_token_id / bos_token_id /
    eos_token_id (Dream's decoding reads none of them: a mask id must be the checkpoint's, the
    others are accepted). seed: paradec's (see the module). Returns Dream's shapes (module doc).
    """
    given = _settings(generation_config, kwargs)
    s = DEFAULTS | given
    explicit_max_length = kwargs.get("max_length") is not None
    ids = _input_ids(inputs)
    b, length = ids.shape
    prompts = left_padded_prompts(ids, attention_mask)
    max_new = _max_new_tokens(model, s, explicit_max_length, length)
    alg, temperature = s["alg"], s["temperature"]
    if alg not in ALGS:
        raise ConfigError(f"alg must be one of {list(ALGS)}, got {alg!r}")
    if abs(float(s["eps"]) - LINSPACE_EPS) > 1e-12:
        raise ConfigError(f"eps={s['eps']}: paradec's linspace schedule ends at Dream's default eps={LINSPACE_EPS}; "
                          f"other end points are not supported")
    if s["mask_token_id"] is not None and s["mask_token_id"] != model.spec.mask_id:
        raise ConfigError(f"mask_token_id={s['mask_token_id']} but this checkpoint's mask id is "
                          f"{model.spec.mask_id}: paradec decodes with the checkpoint's")
    top_p = s["top_p"] if s["top_p"] is not None and s["top_p"] < 1 else None
    top_k = s["top_k"]
    if temperature == 0 and (top_p is not None or top_k is not None):
        raise ConfigError("top_p/top_k at temperature=0: Dream uses them there only to reshape its confidence "
                          "scores, which paradec does not; leave them unset, or give temperature > 0")
    alg_temp = s["alg_temp"] or 0.0
    if alg_temp and alg == "origin":
        raise ConfigError("alg_temp ranks the confidence algorithms (maskgit_plus, topk_margin, entropy); "
                          "alg='origin' decodes in a random order and would ignore it")
    if alg_temp and temperature == 0:
        raise ConfigError("alg_temp at temperature=0: paradec draws the ranking noise from the sampling stream, "
                          "which greedy decoding does not draw; give temperature > 0 or alg_temp=None")
    n = s["num_return_sequences"]
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's global generator, as Dream's draws
    overrides = dict(mode="random" if alg == "origin" else "ao", answer_len=max_new, steps=s["steps"],
                     schedule="linspace", attention="canvas", eos_closes_block=False, temperature=temperature,
                     top_p=top_p, top_k=top_k, seed=seed, num_return_sequences=n)
    if ALGS[alg] is not None:
        overrides["policy"] = ALGS[alg]
    if alg_temp:
        overrides["rank_temperature"] = float(alg_temp)
    if temperature > 0:
        overrides["score_on"] = "sampling"
    results = paradec.generate(model, prompts, **overrides)
    if n > 1:
        results = [r for group in results for r in group]  # prompt-major, as repeat_interleave
    canvas = torch.tensor([r.token_ids for r in results])  # [B * n, max_new]
    prefix = ids.repeat_interleave(n, dim=0)
    sequences = torch.cat((prefix, canvas), dim=1).to(ids.device)
    if not s["return_dict_in_generate"]:
        if s["output_history"]:
            warnings.warn("output_history=True without return_dict_in_generate=True: like Dream, only the "
                          "sequences come back", stacklevel=2)
        return sequences
    history = None
    if s["output_history"]:
        trace = torch.tensor([r.trace for r in results])  # [B * n, max_new] step that committed each
        mask = torch.full_like(canvas, model.spec.mask_id)
        history = [torch.cat((prefix, torch.where(trace <= step, canvas, mask)), dim=1).to(ids.device)
                   for step in range(s["steps"])]
    return DreamModelOutput(sequences=sequences, history=history)


def _settings(generation_config, kwargs: dict) -> dict:
    """Dream's settings given: from ``generation_config`` (an object or a dict), then kwargs."""
    hooks = [h for h in _HOOKS if kwargs.get(h) is not None]
    if hooks:
        raise ConfigError(f"{hooks[0]}: paradec's steps run inside its engine and take no per-step hooks")
    kwargs = {k: v for k, v in kwargs.items() if k not in _HOOKS}
    unknown = sorted(set(kwargs) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown diffusion_generate arguments {unknown}; known: {sorted(DEFAULTS)} "
                          f"(and attention_mask, generation_config, seed)")
    given = {}
    if generation_config is not None:
        read = generation_config.get if isinstance(generation_config, Mapping) else (
            lambda k, d=None: getattr(generation_config, k, d))
        given = {k: read(k) for k in DEFAULTS if read(k, None) is not None}
    return given | kwargs


def _input_ids(inputs) -> torch.Tensor:
    if inputs is None:
        raise InputError("inputs: give the prompt's token ids, a [batch, length] tensor")
    ids = torch.as_tensor(inputs)
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dim() not in (1, 2) or ids.numel() == 0:
        raise InputError(f"inputs must be integer token ids of shape [batch, length], got {ids.dtype} of shape "
                         f"{list(ids.shape)}")
    return ids[None] if ids.dim() == 1 else ids


def _max_new_tokens(model, s: dict, explicit_max_length: bool, length: int) -> int:
    """Dream's rule: max_new_tokens; else max_length - L when max_length was passed (or a
    generation config holds one other than 20); else 20 new tokens (capped by the model's
    positions), with Dream's warning."""
    if s["max_new_tokens"] is not None:
        new = s["max_new_tokens"]
    elif explicit_max_length or s["max_length"] != DEFAULTS["max_length"]:
        new = s["max_length"] - length
        if new <= 0:
            raise ConfigError(f"input length {length} leaves no room: max_length={s['max_length']}; "
                              f"set max_new_tokens")
    else:
        warnings.warn("Using the model-agnostic default `max_length` (=20) to control the generation length; "
                      "set max_new_tokens", UserWarning, stacklevel=3)
        new = min(DEFAULTS["max_length"] + length, model.spec.max_length) - length
    if isinstance(new, bool) or not isinstance(new, int) or new < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {new!r}")
    return new
