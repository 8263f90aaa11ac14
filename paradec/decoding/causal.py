"""The autoregressive baseline in paradec's own runtime: greedy causal decoding of a model's
weights with a static KV cache, each token's step replayed as a CUDA graph.

It decodes the native transformer (LLaDA/Dream shapes) as a causal LM: the prompt under a
causal mask, then one token per forward attending to every earlier token. Trained weights of a
diffusion model are not an AR model, so this is for timing at a shape (the strongest
single-GPU AR decoder a user could run at that size: static cache, one graph launch per token,
no host synchronisation until the end) and for AR checkpoints loaded into the same module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from paradec.errors import InputError
from paradec.models.attention import PAD, PROMPT
from paradec.models.cache import PromptCache
from paradec.models.transformer import DiffusionTransformer

CAPTURE_SLOTS = 2  # warm-up steps before a capture


@dataclass
class CausalOutput:
    tokens: torch.Tensor  # [B, n] the new tokens
    timings: dict[str, float] = field(default_factory=dict)  # seconds: prefill, decode, total


class StaticCausalDecoder:
    """Greedy decoding of up to ``capacity`` tokens (prompt + new) for ``batch`` sequences.

    The KV cache is one [L, 2, B, Hkv, capacity, D] buffer allocated once; step t writes its
    k/v into slot P + t through a device-side index, so every step has the same shapes and a
    CUDA graph captured once replays them all (``graphs=True`` on a CUDA device)."""

    def __init__(self, module: DiffusionTransformer, batch: int, capacity: int, graphs: bool = True):
        if capacity > module.cfg.max_length:
            raise InputError(f"capacity {capacity} exceeds the model's maximum length {module.cfg.max_length}")
        self.module = module
        cfg = module.cfg
        weight = module.embed.weight
        self.device = weight.device
        # Two slots past the capacity: capturing the graph runs two warm-up steps past the last
        # real position when a request uses the whole capacity (their keys stay PAD).
        slots = capacity + CAPTURE_SLOTS
        self.kv = weight.new_zeros(cfg.num_layers, 2, batch, cfg.num_kv_heads, slots, cfg.head_dim)
        self.key_segments = torch.full((batch, slots), PAD, dtype=torch.long, device=self.device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # the last token
        self.cursor = torch.zeros((), dtype=torch.long, device=self.device)  # its position
        self.capacity = capacity
        self.graphs = graphs and self.device.type == "cuda"
        self.graph = None
        self.out = torch.zeros(batch, slots, dtype=torch.long, device=self.device)
        # The cache as the layers see it: every slot a key, written at the slots given.
        self.cache = PromptCache(self.kv, self.key_segments[:, :0], torch.zeros(batch, dtype=torch.long),
                                 weight.new_zeros(batch, cfg.hidden_size))

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int) -> CausalOutput:
        """prompt_ids: [B, P] (no padding) -> the next ``max_new_tokens`` greedy tokens."""
        b, p = prompt_ids.shape
        if b != self.kv.shape[2]:
            raise InputError(f"prompt_ids has {b} rows; this decoder was built for batch {self.kv.shape[2]}")
        if max_new_tokens < 1 or p + max_new_tokens > self.capacity:
            raise InputError(f"max_new_tokens must lie in [1, {self.capacity - p}] for a {p}-token prompt "
                             f"and capacity {self.capacity}, got {max_new_tokens}")
        t0 = self._clock()
        first = self._prefill(prompt_ids)
        t1 = self._clock()
        self.out[:, p].copy_(first)
        self.token.copy_(first[:, None])
        self.cursor.fill_(p)
        if self.graphs and self.graph is None:
            self._capture()
            self.cursor.fill_(p)
            self.token.copy_(first[:, None])
            self.key_segments[:, p:].fill_(PAD)
        for _ in range(max_new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
        t2 = self._clock()
        tokens = self.out[:, p : p + max_new_tokens].clone()
        return CausalOutput(tokens, {"prefill": t1 - t0, "decode": t2 - t1, "total": t2 - t0})

    def _prefill(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Causal forward of the prompt into slots 0..P-1; returns the first new token [B]."""
        b, p = prompt_ids.shape
        positions = torch.arange(p, device=self.device).expand(b, p)
        slots = torch.arange(p, device=self.device)
        keys = torch.arange(self.kv.shape[4], device=self.device)
        mask = (keys[None, :] <= slots[:, None]).expand(b, 1, p, len(keys))  # causal over the slots
        self.key_segments.fill_(PAD)
        self.key_segments[:, :p] = PROMPT
        hidden, _ = self.module.run_layers(self.module.embed(prompt_ids), positions, mask, self.cache, slots)
        return self._next(hidden[:, -1])

    def _step(self) -> None:
        """One token: embed the last token at ``cursor``, write its k/v into slot ``cursor``,
        attend to every filled slot, pick the next token. Nothing waits for the host."""
        m = self.module
        b = self.token.shape[0]
        slot = self.cursor.view(1)
        self.key_segments.index_fill_(1, slot, PROMPT)
        mask = (self.key_segments != PAD)[:, None, None, :]  # [B, 1, 1, capacity]
        hidden, _ = m.run_layers(m.embed(self.token), self.cursor.expand(b, 1), mask, self.cache, slot)
        nxt = self._next(hidden[:, -1])  # [B]
        self.cursor += 1
        self.out.index_copy_(1, self.cursor.view(1), nxt[:, None])
        self.token.copy_(nxt[:, None])

    def _next(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.module.head(hidden).argmax(-1)  # [B, V] -> [B]

    def _capture(self) -> None:
        for _ in range(CAPTURE_SLOTS):  # warm-up on the current stream (see paradec.decoding.step)
            self._step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
