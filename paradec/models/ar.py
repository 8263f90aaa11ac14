"""Autoregressive models for the baselines and the NAR→AR answerer.

Any transformers causal LM in a local directory, decoded with its KV cache: one prefill, then one
token per forward. Greedy at temperature 0, otherwise sampled from a seeded generator.
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from pathlib import Path

import torch

from paradec.errors import CheckpointError, InputError


@dataclass
class ARResult:
    token_ids: list[int]  # the new tokens only, the stop token included when one ended the run
    stopped: bool  # True when a stop id ended the run, False when max_new_tokens did


class ARModel:
    """A causal LM with its tokenizer."""

    def __init__(self, model, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.stop_ids = _stop_ids(model, tokenizer)
        self.max_length = getattr(model.config, "max_position_embeddings", None)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> ARModel:
        from transformers import AutoModelForCausalLM

        from paradec.models.loading import load_tokenizer, parse_device, parse_dtype, resolve

        root = resolve(path)  # a folder, or a built-in model's name (paradec-tiny-answerer)
        if not (root / "config.json").exists():
            raise CheckpointError(f"{root}: no config.json, so not a transformers checkpoint directory")
        device = parse_device(device)
        dtype = parse_dtype(dtype)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        try:  # never the checkpoint's own code (an auto_map): transformers' own classes only
            model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, local_files_only=True,
                                                         trust_remote_code=False)
            tokenizer = load_tokenizer(root)
        except (ValueError, OSError, KeyError) as err:
            raise CheckpointError(f"{root}: not loadable as a causal LM with its tokenizer ({err})") from err
        return cls(model.to(device), tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self,
        input_ids: list[int] | torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int | None = None,
        stop_ids: tuple[int, ...] | None = None,
    ) -> ARResult:
        """Decode up to ``max_new_tokens`` after ``input_ids`` ([T] ids of one sequence)."""
        from transformers import DynamicCache

        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device).reshape(1, -1)  # [1, T]
        if ids.shape[1] == 0:
            raise InputError("input_ids is empty")
        self._check_budget(ids.shape[1], max_new_tokens)
        if temperature < 0:
            raise InputError(f"temperature must be >= 0, got {temperature}")
        stops = set(self.stop_ids if stop_ids is None else stop_ids)
        generator = None
        if temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)
        cache = self._cache(DynamicCache())
        out = self.model(input_ids=ids, **cache, use_cache=True, logits_to_keep=1)
        new: list[int] = []
        for _ in range(max_new_tokens):
            logits = out.logits[0, -1].float()  # [V]
            if generator is None:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            new.append(token)
            if token in stops:
                return ARResult(new, stopped=True)
            step = torch.tensor([[token]], device=self.device)
            out = self.model(input_ids=step, **cache, use_cache=True)  # (the cache grows in place)
        return ARResult(new, stopped=False)

    def _cache(self, cache) -> dict:
        """The keyword a KV cache goes by: ``cache`` from transformers 5.25 (``past_key_values``,
        deprecated there, warns once per forward), ``past_key_values`` before."""
        takes = inspect.signature(self.model.forward).parameters
        return {"cache": cache} if "cache" in takes else {"past_key_values": cache}

    def _check_budget(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if self.max_length is not None and prompt_tokens + max_new_tokens > self.max_length:
            raise InputError(f"{prompt_tokens} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"maximum length {self.max_length}")

    @torch.no_grad()
    def generate_batch(self, prompts: list[list[int]], max_new_tokens: int,
                       stop_ids: tuple[int, ...] | None = None) -> list[ARResult]:
        """Greedy decoding of several prompts at once (left-padded, one KV cache): the same
        tokens as ``generate`` on each, in one forward per step for the whole batch."""
        from transformers import DynamicCache

        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("prompts must be non-empty id lists")
        longest = max(map(len, prompts))
        self._check_budget(longest, max_new_tokens)
        stops = set(self.stop_ids if stop_ids is None else stop_ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        b = len(prompts)
        ids = torch.full((b, longest), pad, dtype=torch.long, device=self.device)  # [B, T] left-padded
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, longest - len(p):] = torch.tensor(p, device=self.device)
            mask[r, longest - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self._cache(DynamicCache())
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache, use_cache=True,
                         logits_to_keep=1)
        new: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        last = positions[:, -1:]  # [B, 1]
        for step in range(max_new_tokens):
            tokens = out.logits[:, -1].float().argmax(-1)  # [B]
            for r, t in enumerate(tokens.tolist()):
                if not done[r]:  # a finished row keeps decoding in the batch; its tokens are dropped
                    new[r].append(t)
                    done[r] = t in stops
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat((mask, torch.ones(b, 1, dtype=mask.dtype, device=self.device)), dim=1)
            last = last + 1
            out = self.model(input_ids=tokens[:, None], attention_mask=mask, position_ids=last, **cache,
                             use_cache=True)
        return [ARResult(n, stopped=d) for n, d in zip(new, done)]



def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    ids = []
    for eos in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        ids += eos if isinstance(eos, list) else [] if eos is None else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids))
