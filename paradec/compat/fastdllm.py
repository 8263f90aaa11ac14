"""Fast-dLLM v1's LLaDA decoders (NVlabs/Fast-dLLM, ``v1/llada/generate.py``) on paradec's engine.

``generate``, ``generate_with_prefix_cache`` and ``generate_with_dual_cache`` take Fast-dLLM's
arguments with its defaults — ``(model, prompt, steps=128, gen_length=128, block_length=128,
temperature=0., remasking='low_confidence', mask_id=126336, threshold=None, factor=None)`` — and
return what it returns: ``(x, nfe)``, ``x`` the ``[B, L + gen_length]`` prompt and answer on the
model's device, ``nfe`` the model forwards. ``model`` is a paradec model (``paradec.load``);
``prompt`` a ``[B, L]`` tensor of token ids. Under greedy decoding the tokens and nfe are Fast-dLLM's
own (``tests/test_compat_fastdllm.py`` pins them against outputs of its code).

The mapping (``paradec.generate`` settings; a ``paradec.decoding.runner.Runner`` decodes):

- ``mode="block"``, ``answer_len=gen_length``, ``block_len=block_length``, full bidirectional
  attention (``attention="canvas"``), no EOS filling (``eos_closes_block=False``);
- ``generate``: ``cache="none"`` (every step forwards prompt and answer);
  ``generate_with_prefix_cache``: ``cache="prefix"`` (a block's first step forwards everything and
  keeps the KV before the block; later steps forward the block and all after it);
  ``generate_with_dual_cache``: ``cache="dual"`` (later steps forward the block alone over the KV
  of everything else, from the block's first step);
- no rule: ``policy="confidence"`` with ``steps`` (each block gets ``steps / num_blocks`` steps,
  split as LLaDA's ``get_num_transfer_tokens``: ``schedule="uniform"``);
- ``threshold=t``: ``policy="threshold", threshold=t``; ``factor=f``: ``policy="factor",
  factor=f``; the rules ignore ``steps`` as Fast-dLLM's do (``steps=None``), except that its dual
  cache stops a block after ``steps / num_blocks`` forwards: see ``FastDLLMRules``.

Fast-dLLM's own decisions where paradec's differ (``FastDLLMRules``, applied by the runner):
confidence is the probability over the whole vocabulary, the mask id's mass included; its factor
rule takes a block's last masked position too when that one alone fails its bound; its dual cache
with a rule leaves what a block did not finish in ``steps / num_blocks`` forwards masked, to later
blocks' first steps. Everything else is paradec's engine unchanged: the same caches, the same
step body (replayed as CUDA graphs on a GPU), the same kernels.

Refused by name, never ignored: ``temperature > 0`` (Fast-dLLM draws its Gumbel noise from
torch's global generator over every forwarded position — twice a step in
``generate_with_prefix_cache`` — so the same tokens cannot be had from paradec's keyed streams:
sample with ``paradec.generate(..., temperature=, seed=)``), ``remasking="random"`` (its ranking
is drawn from the global generator too) and other remasking names, ``threshold`` and ``factor``
together (Fast-dLLM would drop the threshold), a ``mask_id`` other than the checkpoint's, mask
ids inside the prompt (Fast-dLLM would decode them too), and Fast-dLLM's own asserts
(``gen_length % block_length == 0``, ``steps % num_blocks == 0``). Where Fast-dLLM's argmax is the
mask id itself it "commits" [MASK] (the position stays masked; its ``generate`` then runs past its
schedule); paradec never chooses the mask id (DESIGN.md contract 5) and commits the best real
token, so results part there. A trained LLaDA gives the mask id almost no mass.
"""

from __future__ import annotations

import torch

from paradec.api import build_layout, encode_prompt
from paradec.config import GenerationConfig
from paradec.decoding.fastdllm_rules import FastDLLMRules
from paradec.engine import engine_for
from paradec.errors import ConfigError, InputError
from paradec.models.loading import DiffusionModel

REMASKING = ("low_confidence",)


@torch.no_grad()
def generate(model: DiffusionModel, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
             block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
             mask_id: int = 126336, threshold: float | None = None, factor: float | None = None):
    """Fast-dLLM's ``generate`` (no cache): every step forwards prompt and answer. -> (x, nfe)."""
    return _decode("none", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                   threshold, factor)


@torch.no_grad()
def generate_with_prefix_cache(model: DiffusionModel, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                               block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                               mask_id: int = 126336, threshold: float | None = None, factor: float | None = None):
    """Fast-dLLM's ``generate_with_prefix_cache``: a block's later steps reuse the KV before the
    block from its first step. -> (x, nfe)."""
    return _decode("prefix", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                   threshold, factor)


@torch.no_grad()
def generate_with_dual_cache(model: DiffusionModel, prompt: torch.Tensor, steps: int = 128, gen_length: int = 128,
                             block_length: int = 128, temperature: float = 0.0, remasking: str = "low_confidence",
                             mask_id: int = 126336, threshold: float | None = None, factor: float | None = None):
    """Fast-dLLM's ``generate_with_dual_cache``: a block's later steps forward the block alone over
    the KV of everything else from its first step. -> (x, nfe)."""
    return _decode("dual", model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id,
                   threshold, factor)


def config_for(cache: str, steps: int, gen_length: int, block_length: int, threshold: float | None = None,
               factor: float | None = None) -> tuple[GenerationConfig, FastDLLMRules]:
    """The paradec config and Fast-dLLM rules that one of these calls decodes with (its arguments
    already checked): what ``paradec.generate(model, prompt, **asdict-of-config)`` would decode,
    less the rules."""
    settings = dict(mode="block", answer_len=gen_length, block_len=block_length, attention="canvas", cache=cache,
                    eos_closes_block=False, schedule="uniform", temperature=0.0)
    if factor is not None:
        settings |= dict(policy="factor", factor=float(factor), steps=None)
    elif threshold is not None:
        settings |= dict(policy="threshold", threshold=float(threshold), steps=None)
    else:
        settings |= dict(policy="confidence", steps=steps, tokens_per_step=None)
    config = GenerationConfig.build(None, **settings)
    per_block = steps // (gen_length // block_length)
    rule = threshold is not None or factor is not None
    # generate_with_dual_cache's loop makes at most steps / num_blocks forwards a block; a rule that
    # commits one token a step may need block_length of them (a top-k schedule never runs short).
    bounded = cache == "dual" and rule and per_block < block_length
    return config, FastDLLMRules(window_steps=per_block if bounded else None)


def _decode(cache, model, prompt, steps, gen_length, block_length, temperature, remasking, mask_id, threshold,
            factor):
    if not isinstance(model, DiffusionModel):
        raise InputError(f"model must be the DiffusionModel that paradec.load() returns, got {type(model).__name__}")
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if gen_length % block_length:
        raise ConfigError(f"gen_length={gen_length} must be a multiple of block_length={block_length} "
                          f"(Fast-dLLM's assert)")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ConfigError(f"steps={steps} must be a multiple of the {num_blocks} blocks (Fast-dLLM's assert)")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ConfigError(f"temperature must be a number >= 0, got {temperature!r}")
    if temperature > 0:
        raise ConfigError(
            f"temperature={temperature} is not supported: Fast-dLLM draws its Gumbel noise from torch's global "
            f"generator over every forwarded position, which paradec's keyed streams cannot reproduce token for "
            f"token; sample with paradec.generate(..., temperature=..., seed=...) instead")
    if remasking == "random":
        raise ConfigError("remasking='random' is not supported: Fast-dLLM ranks by numbers drawn from torch's "
                          "global generator, which paradec cannot reproduce; use remasking='low_confidence', or "
                          "paradec.generate(mode='random', seed=...) for a random order")
    if remasking not in REMASKING:
        raise ConfigError(f"remasking must be 'low_confidence' ('random' is not supported), got {remasking!r}")
    if mask_id != model.spec.mask_id:
        raise ConfigError(f"mask_id={mask_id} but this checkpoint's mask id is {model.spec.mask_id}: pass "
                          f"mask_id={model.spec.mask_id} (paradec decodes with the checkpoint's)")
    if threshold is not None and factor is not None:
        raise ConfigError(f"threshold={threshold} and factor={factor} given together: Fast-dLLM would use the factor "
                          f"rule and drop the threshold; give one of them")
    ids = _prompt_ids(prompt, mask_id)
    config, rules = config_for(cache, steps, gen_length, block_length, threshold, factor)
    layout = build_layout(model, config)
    prompts = [encode_prompt(model, row, config, layout) for row in ids.tolist()]
    if ids.shape[1] + layout.length > model.spec.max_length:
        raise ConfigError(f"prompt ({ids.shape[1]} tokens) + gen_length ({gen_length}) exceeds the model's maximum "
                          f"length {model.spec.max_length}")
    with engine_for(model).runner(config, layout, prompts, fastdllm=rules) as runner:  # the model's kept runner
        output = runner.run()  # (its CUDA graphs) when free, as paradec.generate uses it
    x = torch.cat((ids.to(model.device), output.canvas), dim=1)  # [B, L + gen_length]
    # Fast-dLLM counts the forwards its loops make: the steps (under CUDA graphs a rule's replays past a
    # block's end run too and count in output.nfe, not in output.steps; called steps, the two are equal).
    return x, output.steps


def _prompt_ids(prompt, mask_id: int) -> torch.Tensor:
    """[B, L] integer token ids on the host; mask ids refused (Fast-dLLM would decode them)."""
    if not isinstance(prompt, torch.Tensor):
        raise InputError(f"prompt must be a [batch, length] tensor of token ids (as Fast-dLLM's), got "
                         f"{type(prompt).__name__}")
    if prompt.dtype == torch.bool or prompt.dtype.is_floating_point or prompt.dtype.is_complex:
        raise InputError(f"prompt must hold integer token ids, got {prompt.dtype}")
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise InputError(f"prompt must be [batch, length] (Fast-dLLM reads prompt.shape[1]), got shape "
                         f"{list(prompt.shape)}")
    ids = prompt.detach().cpu().long()
    if bool((ids == mask_id).any()):
        raise InputError(f"the prompt holds the mask id {mask_id}: Fast-dLLM would decode those positions too; "
                         f"paradec decodes the answer only")
    return ids
