"""The bidirectional transformer that LLaDA and Dream share.

Both are pre-norm decoder stacks with RMSNorm, rotary position embeddings (half-split
rotation), a SwiGLU MLP and no causal mask; they differ in grouped-query attention, q/k/v bias,
tied heads and whether logits are shifted by one position. Checkpoint names are mapped onto
these modules by ``llada.py`` and ``dream.py``. Single-device: no process groups here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from paradec.ops import batch_invariant as bi
from paradec.errors import InputError
from paradec.models.attention import PAD, PROMPT, attention_mask, check_mode
from paradec.models.cache import BlockCache, PromptCache, kv_buffer


@dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int  # rows of the embedding and the output head
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rope_theta: float
    rms_norm_eps: float
    max_length: int
    qkv_bias: bool = False
    tie_embeddings: bool = False
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise InputError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def qkv_sizes(self) -> tuple[int, int, int]:
        kv = self.num_kv_heads * self.head_dim
        return (self.hidden_size, kv, kv)

    def fused_parts(self, name: str) -> tuple[int, ...] | None:
        """Row sizes of the checkpoint tensors fused into parameter ``name``, or None."""
        if name.endswith("attn.qkv_proj.weight") or name.endswith("attn.qkv_proj.bias"):
            return self.qkv_sizes
        if name.endswith("mlp.gate_up_proj.weight"):
            return (self.intermediate_size, self.intermediate_size)
        return None


class Linear(nn.Linear):
    """``nn.Linear`` whose product takes ``paradec.batch_invariant``'s kernel while that mode is
    on (CUDA, no autograd): each row's result is then the same whatever else is in the batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bi.active(x):
            return bi.linear(x, self.weight, self.bias)
        return super().forward(x)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bi.active(x):
            return bi.rms_norm(x, self.weight, self.eps)
        # One fused kernel; it accumulates in fp32 for bf16 inputs, as both published models do.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.register_buffer("inv_freq", self._inv_freq(None), persistent=False)

    def _inv_freq(self, device: torch.device | None) -> torch.Tensor:
        """Frequencies on ``device`` (None: the default device, e.g. of a ``torch.device`` context)."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / (self.theta**exponents)

    def reset(self, device: torch.device) -> None:
        """Recompute the frequencies on ``device`` (after building on the meta device)."""
        self.inv_freq = self._inv_freq(device)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [B, T] -> cos, sin: [B, 1, T, head_dim] in fp32."""
        freqs = positions.clamp(min=0).float()[..., None] * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]
        return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; rotation of the two halves of D, computed in fp32."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# On a GPU each of these is several small kernels per layer (7 for the rotation, ~1 ms of an
# 8B step); compiled, each is one fused kernel. The formulas are the same, but a fused kernel
# keeps its intermediates in fp32 where eager bf16 rounds them, so bf16 logits can differ from
# eager ones in the last bits. Compiled lazily, for CUDA tensors only (CPU runs stay eager);
# PARADEC_COMPILE=0 turns it off.
_FUSE = os.environ.get("PARADEC_COMPILE", "1") != "0"
_fused: dict = {}


def fused(fn):
    def call(*tensors):
        if not (_FUSE and tensors[0].is_cuda):
            return fn(*tensors)
        if fn not in _fused:
            _fused[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        return _fused[fn](*tensors)

    return call


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """x + residual, and its RMSNorm: both [..., d] (one kernel where fused: ~0.2 ms of an 8B
    step, measured in benchmarks/RESULTS.md)."""
    total = x + residual
    return total, F.rms_norm(total, weight.shape, weight, eps)


rotate = fused(apply_rotary)
swiglu = fused(silu_mul)
fused_add_norm = fused(add_rms_norm)


def add_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """``add_rms_norm``: fused (compiled) by default, the batch-invariant kernel in that mode."""
    if bi.active(x):
        return bi.add_rms_norm(x, residual, weight, eps)
    return fused_add_norm(x, residual, weight, eps)


def attend(q, keys, values, mask, gqa: bool) -> torch.Tensor:
    """SDPA, or in the batch-invariant mode its kernel (which takes the same additive mask, or a
    ``bi.MaskedKeys`` naming each row's visible keys). q: [B, H, T, D] -> [B, H, T, D]."""
    if bi.active(q):
        return bi.attention(q, keys, values, mask)
    if isinstance(mask, bi.MaskedKeys):
        mask = mask.additive
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


class Attention(nn.Module):
    """Multi-head or grouped-query attention with one fused q/k/v projection."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, sum(cfg.qkv_sizes), bias=cfg.qkv_bias)
        self.o_proj = Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, d] -> rotated q [B, H, T, D], rotated k and v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        heads = self.qkv_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
        rotated = rotate(heads[:, : self.num_heads + self.num_kv_heads], cos, sin)  # q and k at once
        q, k = rotated.split((self.num_heads, self.num_kv_heads), dim=1)
        return q, k, heads[:, self.num_heads + self.num_kv_heads :]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        past_len: int,
        slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """x: [B, T, d]; past k/v: [B, Hkv, C, D] buffers whose first ``past_len`` tokens are
        cached; when C >= past_len + T this call's k/v are written in place after them (no copy
        of the cache), else concatenated. mask: [B, 1, T, past_len + T], additive (0 or -inf),
        or None: every query sees every key.
        slots: [T] buffer slots (a device tensor) to write this call's k/v into instead; then
        every slot of the buffer is a key and mask is [B, 1, T, C] (a static cache).
        Returns the output [B, T, d] and this call's own k/v [B, Hkv, T, D]."""
        b, t, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)
        keys, values = k, v
        if slots is not None:
            past[0].index_copy_(2, slots, k)
            past[1].index_copy_(2, slots, v)
            keys, values = past
        elif past is not None and past[0].shape[2] >= past_len + t:
            end = past_len + t
            past[0][:, :, past_len:end].copy_(k)
            past[1][:, :, past_len:end].copy_(v)
            keys, values = past[0][:, :, :end], past[1][:, :, :end]
        elif past is not None:
            keys = torch.cat((past[0][:, :, :past_len], k), dim=2)
            values = torch.cat((past[1][:, :, :past_len], v), dim=2)
        out = attend(q, keys, values, mask, self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)

    def forward_blocks(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: torch.Tensor, bias: torch.Tensor | None,
        slots: torch.Tensor,
    ) -> torch.Tensor:
        """Attention of isolated blocks side by side, each over its own keys only (see
        ``BlockCache``). x: [B, m * S, d], block-major (block j's S queries together); kv: this
        layer's [2, B * m, C, Hkv, D]; bias: [B * m, 1, 1, C] or None; slots: [B * m * S] flat
        slots (row * C + slot) where this call's k/v are written first. Returns [B, m * S, d]."""
        b, t, _ = x.shape
        rows, hkv, d = kv.shape[1], self.num_kv_heads, self.head_dim
        s = t * b // rows
        q, k, v = self._qkv(x, cos, sin)
        for buffer, new in ((kv[0], k), (kv[1], v)):  # [B, Hkv, T, D] -> rows (b, block, query)
            buffer.view(-1, hkv, d).index_copy_(0, slots, new.transpose(1, 2).reshape(-1, hkv, d))
        q = q.reshape(b, self.num_heads, rows // b, s, d).transpose(1, 2).reshape(rows, self.num_heads, s, d)
        out = attend(q, kv[0].transpose(1, 2), kv[1].transpose(1, 2), bias, self.num_heads != hkv)  # [B * m, H, S, D]
        return self.o_proj(out.view(b, rows // b, self.num_heads, s, d).permute(0, 1, 3, 2, 4).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up in one fused projection."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(swiglu(gate, up))


class Layer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, mask, past, past_len, slots=None):
        attn_out, kv = self.attn(self.attn_norm(x), cos, sin, mask, past, past_len, slots)
        x, normed = add_norm(x, attn_out, self.mlp_norm.weight, self.mlp_norm.eps)
        return x + self.mlp(normed), kv

    def forward_blocks(self, x, cos, sin, kv, bias, slots):
        attn_out = self.attn.forward_blocks(self.attn_norm(x), cos, sin, kv, bias, slots)
        x, normed = add_norm(x, attn_out, self.mlp_norm.weight, self.mlp_norm.eps)
        return x + self.mlp(normed)


class DiffusionTransformer(nn.Module):
    """A masked-diffusion transformer with one forward for every decoding mode."""

    def __init__(self, cfg: TransformerConfig, shift_logits: bool):
        super().__init__()
        self.cfg = cfg
        self.shift_logits = shift_logits
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _check(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor) -> None:
        if input_ids.dim() != 2 or positions.shape != input_ids.shape or segments.shape != input_ids.shape:
            raise InputError(
                "input_ids, positions and segments must all be [B, T]; got "
                f"{tuple(input_ids.shape)}, {tuple(positions.shape)}, {tuple(segments.shape)}"
            )
        if input_ids.numel() == 0:
            return
        top = int(positions.max())
        if top >= self.cfg.max_length:
            raise InputError(f"position {top} is beyond the model's maximum length {self.cfg.max_length}")
        real = segments != PAD
        ids = input_ids[real]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise InputError(f"input_ids must lie in [0, {self.cfg.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: PromptCache | None,
        slots: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every layer over embedded inputs, without the final norm and head.

        x: [B, T, d] (``embed`` of the ids); positions: [B, T]; mask: [B, 1, T, K] boolean,
        True where a query sees a key, K = cache.num_tokens + T (or C, the cache's capacity,
        with ``slots``), or None; cache: the KV the queries also attend to, or None; slots: [T]
        cache slots where these tokens' k/v are written first (a static cache, see
        ``Attention.forward``). Returns hidden [B, T, d] and each layer's new (k, v), each
        [B, Hkv, T, D] (written into the cache at ``slots`` when given). The mask is turned here
        once into the additive form that attention kernels take (given a boolean one, each
        layer's call would convert it again: ~4.5 µs a layer at an 8B step's shapes); None when
        every query attends to every key (see ``forward``'s ``dense``). In the batch-invariant
        mode the mask also names each row's visible keys, once for every layer (``bi.MaskedKeys``)."""
        if mask is not None:  # rows padded to 8 elements in storage: SDPA takes such a slice without a copy
            keys = mask.shape[-1]
            storage = torch.zeros(*mask.shape[:-1], -(-keys // 8) * 8, dtype=x.dtype, device=x.device)
            additive = storage[..., :keys].masked_fill_(~mask, float("-inf"))
            mask = bi.masked_keys(mask, additive) if bi.active(x) else additive
        cos, sin = self.rope(positions)
        new_kv = []
        for i, layer in enumerate(self.layers):
            past = None if cache is None else (cache.kv[i, 0], cache.kv[i, 1])
            x, kv = layer(x, cos, sin, mask, past, 0 if cache is None else cache.num_tokens, slots)
            new_kv.append(kv)
        return x, new_kv

    @torch.no_grad()
    def prefill(
        self, prompt_ids: torch.Tensor, lengths: torch.Tensor, reserve: int = 0, check_inputs: bool = True
    ) -> PromptCache:
        """prompt_ids: [B, P] right-padded; lengths: [B] -> the prompts' KV cache, with room for
        ``reserve`` more tokens (the largest forward that will use it, to avoid a copy per step)."""
        b, p = prompt_ids.shape
        lengths = lengths.to(prompt_ids.device)
        if check_inputs and (lengths.numel() != b or int(lengths.min()) < 1 or int(lengths.max()) > p):
            raise InputError(f"lengths must be [B] = [{b}] values in [1, {p}], got {lengths.tolist()}")
        positions = torch.arange(p, device=prompt_ids.device).expand(b, p)
        segments = torch.where(positions < lengths[:, None], PROMPT, PAD)
        positions = torch.where(segments == PAD, -1, positions)
        if check_inputs:
            self._check(prompt_ids, positions, segments)
        mask = attention_mask(segments, segments, "isolated")
        hidden, kv = self.run_layers(self.embed(prompt_ids.clamp(min=0)), positions, mask, None)
        kv = kv_buffer(None, kv, reserve)
        last = hidden[torch.arange(b, device=hidden.device), lengths - 1]  # [B, d]
        return PromptCache(kv=kv, segments=segments, lengths=lengths, last_hidden=last)

    @torch.no_grad()
    def extend(
        self,
        cache: PromptCache,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        reserve: int = 0,
    ) -> PromptCache:
        """A new cache holding ``cache`` plus these tokens' KV (finished think blocks, say,
        before the summary decodes). Exact under ``isolated`` when nothing cached attends to
        tokens that come later. input_ids, positions, segments: [B, T]."""
        check_mode(mode)
        self._check(input_ids, positions, segments)
        key_segments = torch.cat((cache.segments, segments), dim=1)
        mask = attention_mask(segments, key_segments, mode)
        _, kv = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache)
        buffer = kv_buffer(cache.kv[..., : cache.num_tokens, :], kv, reserve)
        return PromptCache(kv=buffer, segments=key_segments, lengths=cache.lengths, last_hidden=cache.last_hidden)

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        cache: PromptCache | None = None,
        logits_at: torch.Tensor | None = None,
        check_inputs: bool = True,
        dense: bool = False,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for the positions asked for, and only those.

        input_ids, positions, segments: [B, T] (segments from ``AttentionSpec.segment_ids``;
        PAD marks padding); cache: the prompt KV of the same B sequences, or None when the prompt
        is part of the input; logits_at: [B, N] absolute positions whose token distribution is
        wanted (default: every input position). Returns [B, N, V] in the model dtype.

        A shifted model (Dream) predicts position p from the hidden state at p - 1, which must be
        in the input or be the last prompt token of ``cache``.

        dense: the caller knows that under ``mode`` every query attends to every key (no PAD
        among them, one segment or ``canvas`` attention); attention then runs with no mask,
        which the fastest kernels take (an all-true mask still costs its reads: 38 against
        23 µs a layer at an 8B block step's shapes). Checked when ``check_inputs``.

        slots: [T] slots of ``cache`` where these tokens' k/v are written before they attend
        (a static cache: every slot is then a key, and ``cache.segments`` covers all of them).
        """
        check_mode(mode)
        if check_inputs:
            self._check(input_ids, positions, segments)
        if slots is None:
            key_segments = segments if cache is None else torch.cat((cache.segments, segments), dim=1)
        elif cache is None or cache.capacity != cache.num_tokens or slots.shape != (input_ids.shape[1],):
            raise InputError("slots needs a cache whose segments cover all its slots and one slot per input column")
        else:
            key_segments = cache.segments
        mask = None if dense and not check_inputs else attention_mask(segments, key_segments, mode)
        if dense and mask is not None:  # checked, then dropped
            if not bool(mask.all()):
                raise InputError(f"dense=True, but under {mode!r} attention some query may not see some key "
                                 "(padding, or another block's keys)")
            mask = None
        hidden, _ = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache, slots)
        if logits_at is None:
            logits_at = positions
        rows = self.gather_rows(hidden, positions, segments, logits_at, cache, check_inputs)
        return self.head(rows)

    @torch.no_grad()
    def forward_blocks(
        self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, cache: BlockCache,
        slots: torch.Tensor, logits_at: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` for m isolated blocks' queries over a ``BlockCache``: input_ids,
        positions, segments: [B, m * S], block-major, every column real (pad a block's queries by
        repeating one of its columns: the repeat writes the same k/v to the same slot); slots:
        [B * m * S] flat cache slots of the queries, where their k/v are written before the
        blocks attend; logits_at: [B, N]. Returns logits [B, N, V]. A shifted model's
        predecessor columns must be among the queries."""
        x = self.embed(input_ids.clamp(min=0))
        cos, sin = self.rope(positions)
        bias = cache.bias
        if bias is not None and bi.active(x):  # each row's visible slots, once for every layer
            bias = bi.MaskedKeys(bias, *bi.key_order(bias[:, 0, 0] > float("-inf")))
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x, cos, sin, cache.kv[i], bias, slots)
        return self.head(self.gather_rows(x, positions, segments, logits_at, None, check_inputs=False))

    @torch.no_grad()
    def forward_and_cache(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        cache: PromptCache | None,
        logits_at: torch.Tensor,
        keep: torch.Tensor,
        reserve: int,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PromptCache]:
        """``forward`` that also returns a cache for the steps that follow (a window's refresh).

        The new cache holds ``cache`` (if any) plus the KV of the input columns where ``keep``
        ([T] bool, the same for every row) is True, with room for ``reserve`` tokens; the columns
        left out are the ones later steps recompute. With ``cache=None`` the prompt is part of
        the input: ``lengths`` ([B]) gives each prompt's length (its tokens are input columns
        ``0..length-1``), and the last prompt token's hidden state is taken from this forward.
        Reusing this KV while the recomputed columns change is exact only where nothing kept
        attends to them (``isolated`` prompt KV); otherwise it is the prefix/dual-cache
        approximation of Fast-dLLM. Returns logits [B, N, V] and the cache."""
        check_mode(mode)
        key_segments = segments if cache is None else torch.cat((cache.segments, segments), dim=1)
        mask = attention_mask(segments, key_segments, mode)
        hidden, kv = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache)
        rows = self.gather_rows(hidden, positions, segments, logits_at, cache, check_inputs=False)
        logits = self.head(rows)
        kept = keep.nonzero()[:, 0]  # [K] input columns whose KV is kept
        kept_kv = [(k[:, :, kept], v[:, :, kept]) for k, v in kv]
        if cache is None:
            b = input_ids.shape[0]
            last = hidden[torch.arange(b, device=hidden.device), lengths - 1]  # [B, d]
            return logits, PromptCache(kv_buffer(None, kept_kv, reserve), segments[:, kept], lengths, last)
        buffer = kv_buffer(cache.kv[..., : cache.num_tokens, :], kept_kv, reserve)
        key_segments = torch.cat((cache.segments, segments[:, kept]), dim=1)
        return logits, PromptCache(buffer, key_segments, cache.lengths, cache.last_hidden)

    def training_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, mode: str,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Differentiable logits for training: the whole sequence in one forward (no cache),
        logits only where ``targets`` is True, the logit shift applied (a shifted model predicts
        position p from the hidden state at p - 1, which must be in the input).

        input_ids, positions, segments, targets: [B, T] -> [M, V] for the M target positions in
        row-major order."""
        check_mode(mode)
        mask = attention_mask(segments, segments, mode)
        hidden, _ = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, None)  # [B, T, d]
        if self.shift_logits:
            if bool(targets[:, 0].any()):
                raise InputError("a shifted model cannot be trained to predict position 0 of a sequence")
            rows = hidden[:, :-1][targets[:, 1:]]
        else:
            rows = hidden[targets]
        return self.head(rows)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, output head and logit scale: hidden [..., d] -> logits [..., V]."""
        logits = self.lm_head(self.norm(hidden))
        return logits * self.cfg.logit_scale if self.cfg.logit_scale != 1.0 else logits

    def gather_rows(
        self, hidden: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, logits_at: torch.Tensor,
        cache: PromptCache | None, check_inputs: bool,
    ) -> torch.Tensor:
        """Hidden states that predict ``logits_at``: [B, N, d], for ``head``.

        hidden: [B, T, d] (``run_layers``' output); positions, segments: [B, T] of its columns;
        logits_at: [B, N] absolute positions (< 0: not wanted; that row is arbitrary). A shifted
        model reads position p - 1's state, from the columns or, for the first position after
        the prompt, from ``cache.last_hidden`` ([B, d]). With ``check_inputs`` a wanted position
        whose state is in neither raises ``InputError``."""
        source = logits_at - int(self.shift_logits)
        if self.shift_logits:
            # Dream's convention: position 0 has no predecessor and is read from itself.
            source = torch.where(logits_at == 0, 0, source)
        real = segments != PAD
        match = (positions[:, None, :] == source[:, :, None]) & real[:, None, :]  # [B, N, T]
        found = match.any(-1)
        rows = hidden.gather(1, match.float().argmax(-1, keepdim=True).expand(-1, -1, hidden.shape[-1]))
        missing = ~found & (logits_at >= 0)
        if cache is not None and self.shift_logits:
            from_cache = missing & (source == (cache.lengths - 1)[:, None])
            rows = torch.where(from_cache[..., None], cache.last_hidden[:, None, :], rows)
            missing = missing & ~from_cache
        if check_inputs and bool(missing.any()):
            b, n = missing.nonzero()[0].tolist()
            raise InputError(
                f"logits_at[{b}, {n}] = {int(logits_at[b, n])} needs the hidden state at position "
                f"{int(source[b, n])}, which is neither in the input nor the cached prompt's last token"
            )
        return rows


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
