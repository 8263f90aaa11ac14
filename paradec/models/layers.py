"""The transformer's layer: pre-norm attention and SwiGLU MLP, with their building blocks.

Each product, norm and attention call takes ``paradec.ops.batch_invariant``'s kernel while that
mode is on; the small elementwise ops (rotation, SwiGLU, add + norm) are compiled into one kernel
each on CUDA (``fused``). Without autograd on CUDA, two single-purpose Triton kernels take
their place, each with its own switch: SwiGLU's activation (``paradec.ops.swiglu``) and, in the
batching engine's rows, the rotation with the KV writes (``paradec.ops.rope_kv``, which also
replaces the indexed writes into the rows).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from paradec.models.cache import PackedQueries
from paradec.models.transformer_config import TransformerConfig
from paradec.ops import batch_invariant as bi
from paradec.ops import rope_kv
from paradec.ops import swiglu as swiglu_kernel


class Linear(nn.Linear):
    """``nn.Linear`` whose product takes ``paradec.ops.batch_invariant``'s kernel while that mode is
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
# PARADEC_COMPILE=0 turns it off. Dynamo compiles a function at most ``recompile_limit`` (8)
# times, once per kind of input (dtype, device, layout, grad mode; sizes but 0 and 1 are dynamic): a process
# that meets more kinds (models of several dtypes, training then decoding) runs the new kinds
# eager, with one warning, instead of failing (fullgraph=True raises at the limit).
_FUSE = os.environ.get("PARADEC_COMPILE", "1") != "0"
_fused: dict = {}
_eager: set = set()  # (fn, input kind) that met the recompile limit
_warned: set = set()  # functions whose limit was reported


def fused(fn):
    def call(*tensors):
        if not (_FUSE and tensors[0].is_cuda):
            return fn(*tensors)
        if _eager and _kind(fn, tensors) in _eager:
            return fn(*tensors)
        if fn not in _fused:
            _fused[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return _fused[fn](*tensors)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            if fn not in _warned:
                _warned.add(fn)
                warnings.warn(f"torch.compile's recompile limit reached for {fn.__name__}: its new kinds of "
                              "input run eager (the same formula, unfused)", RuntimeWarning, stacklevel=2)
            _eager.add(_kind(fn, tensors))
            return fn(*tensors)

    return call


def _kind(fn, args) -> tuple:
    """What a compiled function's guards tell its inputs apart by, sizes aside: the grad mode,
    and each tensor's dtype, device, rank, sizes of 0 or 1 (specialised even when dynamic),
    stride order and grad; a number's value. Finer than the guards is safe (a kind not yet met
    tries the compiled function first); coarser would send a compiled kind eager."""
    def tensor(a: torch.Tensor) -> tuple:
        order = tuple(sorted(range(a.dim()), key=lambda i: -a.stride(i)))
        return a.dtype, a.device, tuple(n if n < 2 else 2 for n in a.shape), order, a.is_contiguous(), a.requires_grad

    return (fn, torch.is_grad_enabled(), *(tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, d] -> the fused projection's heads [B, T, H + 2 Hkv, D]."""
        return self.qkv_proj(x).view(*x.shape[:2], -1, self.head_dim)

    def _qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [B, T, d] -> rotated q [B, H, T, D], rotated k and v [B, Hkv, T, D]."""
        heads = self._heads(x).transpose(1, 2)  # [B, H + 2 Hkv, T, D]
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
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """x: [B, T, d]; past k/v: [B, Hkv, C, D] buffers whose first ``past_len`` tokens are
        cached; when C >= past_len + T this call's k/v are written in place after them (no copy
        of the cache), else concatenated. mask: [B, 1, T, past_len + T], additive (0 or -inf),
        or None: every query sees every key.
        slots: [T] buffer slots (a device tensor) to write this call's k/v into instead, or [B, T]
        each row's own (a pool of rows, ``paradec.batching``); then every slot of the buffer is a
        key and mask is [B, 1, T, C] (a static cache).
        slots may also be ``PackedQueries``: x [1, N, d] holds only the real queries of a
        [B, T] batch of rows (mask [B, 1, T, C] over them, past: the rows' static cache).
        Returns the output [B, T, d] ([1, N, d] packed) and this call's own k/v [B, Hkv, T, D]
        (None with each row's own slots or packed queries: they are written into the rows only)."""
        b, t, _ = x.shape
        gqa = self.num_heads != self.num_kv_heads
        if isinstance(slots, PackedQueries):
            q = self._qkv_into_rows(x, cos, sin, past, slots.rows[None], slots.slots[None])
            return self._packed(q, mask, past, slots), None
        if slots is not None and slots.dim() == 2:
            out = attend(self._qkv_into_rows(x, cos, sin, past, None, slots), past[0], past[1], mask, gqa)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), None
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
        out = attend(q, keys, values, mask, gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), (k, v)

    def _qkv_into_rows(self, x, cos, sin, past, rows: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
        """``_qkv``, its k and v written into the rows of a pool (``past``: [R, Hkv, S, D] views)
        at ``rows`` (None: row b for batch row b) and ``slots`` ([B, T]): returns q [B, H, T, D].
        Outside the batch-invariant mode, on the devices ``paradec.ops.rope_kv`` routes (opt-in),
        its one kernel rotates and writes."""
        if rope_kv.usable(x) and not bi.active(x):
            return rope_kv.rope_kv(self._heads(x), cos, sin, past[0], past[1], rows, slots, self.num_heads,
                                   self.num_kv_heads)
        q, k, v = self._qkv(x, cos, sin)
        if rows is None:
            rows = torch.arange(x.shape[0], device=slots.device)[:, None]
        past[0][rows, :, slots] = k.transpose(1, 2)  # [B, T, Hkv, D] into each column's row and slot
        past[1][rows, :, slots] = v.transpose(1, 2)
        return q

    def _packed(self, q, mask, past, packed: PackedQueries) -> torch.Tensor:
        """``forward`` of packed queries (their k/v already in the rows): q [1, H, N, D] -> [1, N, d]."""
        rows, heads = packed.batch * packed.width, q.shape[1]
        padded = q.new_zeros(rows, heads, self.head_dim).index_copy_(0, packed.padded, q[0].transpose(0, 1))
        padded = padded.view(packed.batch, packed.width, heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        out = attend(padded, past[0], past[1], mask, self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(rows, -1)[packed.padded][None])

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
        gate_up = self.gate_up_proj(x)  # [..., 2 I]
        if swiglu_kernel.usable(gate_up):
            return self.down_proj(swiglu_kernel.silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
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
