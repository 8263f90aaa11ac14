"""LLaDA's sampler (``generate.py`` of ML-GSAI/LLaDA) on paradec's engine.

``generate(model, prompt, attention_mask=None, steps=128, gen_length=128, block_length=128,
temperature=0., cfg_scale=0., remasking='low_confidence', mask_id=126336)`` returns what LLaDA's
returns: ``x`` of shape ``[B, L + gen_length]``, the prompt as given (padding included) then the
generated tokens.

The mapping: ``mode="block"`` with ``block_len=block_length`` over ``answer_len=gen_length``,
``steps`` shared equally by the blocks and split within a block as LLaDA's
``get_num_transfer_tokens`` does (``schedule="uniform"``), full bidirectional attention over
prompt and answer with no cache (``attention="canvas"``, ``cache="none"``: LLaDA's forward of
everything every step), ``policy="confidence"`` on the model's distribution at temperature 1,
float64 Gumbel-max sampling at ``temperature``, no EOS filling (``eos_closes_block=False``).

- ``remasking="random"``: ``mode="random"`` (positions in a random order, the same counts per
  step); paradec's random order is one region, so it needs ``block_length == gen_length``.
- ``cfg_scale > 0`` (classifier-free guidance): every step also forwards an unconditional copy
  whose prompt tokens are the mask id, in the same batch, and scores
  ``un + (cfg_scale + 1) * (cond - un)``, as LLaDA does. It wraps the model's forward
  (``Guided``), so it runs with ``attention="canvas"`` and eager steps (no cache, no CUDA graphs).
- ``attention_mask``: left padding; each row decodes after its own tokens with positions from its
  first real token (LLaDA's own code keeps the padding's positions, so a padded row's tokens can
  differ from LLaDA's; an unpadded batch matches).
- ``seed``: paradec's streams (None: drawn from torch's global generator, so
  ``torch.manual_seed`` makes a call repeatable); row b uses seed + b.

LLaDA's own asserts are kept (``gen_length % block_length == 0``, ``steps % num_blocks == 0``).
Where a block has more steps than tokens, LLaDA spends steps committing nothing and paradec does
not: the tokens are the same. Refused by name: ``mask_id`` other than the checkpoint's,
``logits_eos_inf`` and ``confidence_eos_eot_inf`` (paradec bars EOS only in think blocks and the
summary's first tokens), ``remasking="random"`` over several blocks, other remasking names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import paradec
from paradec.compat import left_padded_prompts
from paradec.errors import ConfigError, InputError
from paradec.models.attention import PROMPT
from paradec.models.loading import DiffusionModel

REMASKING = ("low_confidence", "random")


@dataclass
class Guided(DiffusionModel):
    """A model whose forward applies LLaDA's classifier-free guidance: the batch is forwarded
    twice in one call, the second copy with its prompt tokens replaced by the mask id, and the
    logits are ``un + (scale + 1) * (cond - un)``. Forwards that reuse a KV cache are refused
    (the unconditional copy would need a cache of its own)."""

    scale: float = 0.0

    def forward(self, ids, positions, segments, attention, cache=None, logits_at=None, **kwargs):
        if cache is not None:
            raise ConfigError("cfg_scale needs a forward of the whole prompt every step: attention='canvas', no cache")
        uncond = torch.where(segments == PROMPT, self.spec.mask_id, ids)  # [B, T] prompt -> mask id
        two = lambda t: None if t is None else torch.cat((t, t))  # noqa: E731
        logits = self.module(torch.cat((ids, uncond)), two(positions), two(segments), attention, cache=None,
                             logits_at=two(logits_at), **kwargs)
        cond, un = logits.chunk(2)
        return un + (self.scale + 1) * (cond - un)

    __call__ = forward


@torch.no_grad()
def generate(model: DiffusionModel, prompt: torch.Tensor, attention_mask: torch.Tensor | None = None, steps: int = 128,
             gen_length: int = 128, block_length: int = 128, temperature: float = 0.0, cfg_scale: float = 0.0,
             remasking: str = "low_confidence", mask_id: int = 126336, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, *, seed: int | None = None) -> torch.Tensor:
    """LLaDA's ``generate`` for a paradec model (``paradec.load``); see the module."""
    if remasking not in REMASKING:
        raise ConfigError(f"remasking must be one of {list(REMASKING)}, got {remasking!r}")
    if mask_id != model.spec.mask_id:
        raise ConfigError(f"mask_id={mask_id} but this checkpoint's mask id is {model.spec.mask_id}: pass "
                          f"mask_id={model.spec.mask_id} (paradec decodes with the checkpoint's)")
    for name, value in (("logits_eos_inf", logits_eos_inf), ("confidence_eos_eot_inf", confidence_eos_eot_inf)):
        if value:
            raise ConfigError(f"{name}=True is not supported: paradec bars EOS only inside think blocks and the "
                              f"summary's first tokens (bar_eos_in_blocks, summary_min_tokens)")
    for name, value in (("steps", steps), ("gen_length", gen_length), ("block_length", block_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
    if gen_length % block_length:
        raise ConfigError(f"gen_length={gen_length} must be a multiple of block_length={block_length} (LLaDA's assert)")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ConfigError(f"steps={steps} must be a multiple of the {num_blocks} blocks (LLaDA's assert)")
    if remasking == "random" and num_blocks > 1:
        raise ConfigError("remasking='random' over several blocks: paradec's random order decodes one region; "
                          "give block_length=gen_length")
    if not (cfg_scale >= 0):
        raise ConfigError(f"cfg_scale must be >= 0, got {cfg_scale}")
    ids = torch.as_tensor(prompt)
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dim() != 2 or ids.numel() == 0:
        raise InputError(f"prompt must be integer token ids of shape [batch, length], got {ids.dtype} of shape "
                         f"{list(ids.shape)}")
    prompts = left_padded_prompts(ids, attention_mask)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    overrides = dict(answer_len=gen_length, steps=steps, schedule="uniform", attention="canvas",
                     eos_closes_block=False, temperature=float(temperature), seed=seed)
    if remasking == "random":
        overrides["mode"] = "random"
    else:
        overrides |= dict(mode="block", block_len=block_length, cache="none", policy="confidence")
    runner_model = model
    if cfg_scale > 0:
        runner_model = Guided(module=model.module, spec=model.spec, tokenizer=model.tokenizer,
                              generation=model.generation, headers=model.headers, scale=float(cfg_scale))
    results = paradec.generate(runner_model, prompts, **overrides)
    canvas = torch.tensor([r.token_ids for r in results])  # [B, gen_length]
    return torch.cat((ids.cpu(), canvas), dim=1).to(ids.device)


