"""Batch-invariant kernels: each row's result does not depend on how many rows share the call,
where the row sits, or how much padding its neighbours bring (issue 27; DESIGN.md contracts 3, 7).

On a GPU, cuBLAS picks its GEMM kernel (tile shape, split-K) by the number of rows, the
attention kernels split the keys by batch size and take another path when there is a mask, and a
bf16 logit that lands on the other side of a rounding boundary flips a greedy argmax. In this
mode the model's reductions run through the kernels below instead, each with one reduction order
per row:

- ``linear``: ``x @ W.T`` (+ bias) in Triton, bf16/fp16 operands on the tensor cores and fp32
  accumulation (fp32 operands in IEEE fp32). Its tiles and its split-K count come from (N, K)
  alone (``gemm_config``), never from M; the K splits are summed in a fixed order (0, 1, ...)
  from an fp32 workspace, no atomics on the values.
- ``rms_norm`` / ``add_rms_norm``: one row per program, block and warps from the row size.
- ``attention``: a flash-attention forward over a fixed split of the keys (``KV_SPLIT`` keys a
  program, the splits combined in order by a second kernel). The queries of a row are grouped by
  attention segment (``masked_keys``; the queries of one segment see the same keys), and each
  group visits only its own visible keys, in index order (``key_order``): a query's sums run over
  the same keys in the same tiles whether its row holds padding (a batch of mixed lengths), other
  think blocks masked away (a batching engine's row) or nothing else (a block in a row of its
  own, as ``generate()`` steps NAP blocks side by side).

Each kernel has a plain-torch twin beside it (``*_twin``) that the tests compare it with.
Elementwise work (rotary, SwiGLU, the logit scale) and gathers are row-invariant already and
stay as they are. Scoring (``paradec.ops.score``) asks ``enabled()``: the CUDA score kernel then
splits each row by V alone, and the plain-torch scoring that filtered sampling takes runs in
calls of a fixed row count; selection compares values only.

The switch: ``PARADEC_BATCH_INVARIANT=1`` for a whole process, or ``batch_invariant(True)``
(a context manager; process-wide, not per thread) / ``set_batch_invariant``. The model layer
(``paradec.models.transformer``) asks ``active(x)``: on, ``x`` on CUDA and no autograd (training
keeps the default kernels); there, without triton, it raises. CPU paths never change, so the mode
switches on a CPU-only machine without triton too. CUDA graphs captured in
one mode keep that mode's kernels: release kept runners (``paradec.engine_for(model).release_kept()``)
after switching.

Measured (H200, LLaDA-8B shape, benchmarks/RESULTS.md): with the mode, 8 requests decoded in one
batch equal each decoded alone (block dual cache and NAP windows), and so do 8 requests of mixed
settings joining a continuous-batching engine (``paradec.batching``); a think block decoded alone
equals it beside the others; graphs on equal graphs off. Step time 1.04x the default at 32 rows
a step, 1.39x at 128 (NAP m = 4: the Triton GEMM at 128 rows), 1.18x for AR.

A leaf module: it imports nothing from paradec.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = tl = None
    HAVE_TRITON = False

ENV = "PARADEC_BATCH_INVARIANT"
_state = {"on": os.environ.get(ENV, "0") == "1"}
# Where ``active`` routes; the tests add "cpu" to run the model through the Triton interpreter.
DEVICES = {"cuda"}
# Triton's interpreter (TRITON_INTERPRET=1, CPU) mis-computes bf16 dots: the kernels then upcast
# their operands to fp32 before tl.dot (the same order of reduction, other rounding).
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# --- the switch ---------------------------------------------------------------------------------
def enabled() -> bool:
    """Whether the mode is on (``PARADEC_BATCH_INVARIANT=1`` or ``set_batch_invariant(True)``)."""
    return _state["on"]


def set_batch_invariant(on: bool) -> bool:
    """Turns the mode on or off for the whole process; returns the previous setting. Without
    triton it still switches (CPU paths never change); a CUDA op in the mode then raises."""
    previous, _state["on"] = _state["on"], bool(on)
    return previous


@contextlib.contextmanager
def batch_invariant(on: bool = True) -> Iterator[None]:
    """``with batch_invariant():`` runs the model's reductions on the batch-invariant kernels."""
    previous = set_batch_invariant(on)
    try:
        yield
    finally:
        set_batch_invariant(previous)


def active(x: torch.Tensor) -> bool:
    """Whether a model op on ``x`` should take the batch-invariant kernels now."""
    if not (_state["on"] and x.device.type in DEVICES and not torch.is_grad_enabled()):
        return False
    if not HAVE_TRITON:
        raise RuntimeError(f"the batch-invariant mode on {x.device.type} needs triton (it ships with CUDA builds of "
                           f"torch); install it, or decode with batch_invariant=False")
    return True


# --- matmul ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split: int  # K splits, each k_per_split long (the last may be shorter)
    k_per_split: int
    warps: int
    stages: int


# Tunables, read by ``gemm_config``. None of them may depend on M. ``target``: programs wanted at
# M <= block_m (about one per SM of an H100/H200, so that the weights stream from every SM; 256
# was slower at every M measured on an H200, benchmarks/RESULTS.md);
# ``min_k_blocks``: the shortest split, in block_k steps; ``serial``: the last program of a tile to
# finish sums the splits (one launch), else a second kernel does (the same sum, the same bits).
GEMM = {"block_m": 64, "block_n": 128, "block_k": 64, "warps": 4, "stages": 4, "target": 132,
        "min_k_blocks": 4, "serial": False}
MAX_ROWS = 2048  # rows per launch when split (bounds the fp32 workspace); rows are independent


def gemm_config(n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """The tiles and split-K of ``x @ W.T`` for W: [n, k]: a function of (n, k, dtype) only."""
    g = GEMM
    block_k = g["block_k"] if dtype != torch.float32 else min(g["block_k"], 32)
    block_n = g["block_n"] if n > 64 else 64
    tiles = triton.cdiv(n, block_n)
    k_blocks = triton.cdiv(k, block_k)
    split = max(1, min(triton.cdiv(g["target"], tiles), k_blocks // g["min_k_blocks"]))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, k_per_split)
    stages = g["stages"] if dtype != torch.float32 else min(g["stages"], 3)
    return GemmConfig(g["block_m"], block_n, block_k, split, k_per_split, g["warps"], stages)


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["M"])
    def _mm_kernel(X, W, Bias, Y, Work, Count, M, N, K, k_per_split, split,
                   sxm, sxk, swn, swk, sym, syn,
                   HAS_BIAS: tl.constexpr, SERIAL: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program order: row tiles fastest, then splits, then column tiles, so programs that read
        # the same weight tile run together (the weights are read from memory about once).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        pid_m = pid % num_m
        rest = pid // num_m
        pid_s = rest % split
        pid_n = rest // split
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        k_start = pid_s * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        x_ptr = X + offs_m[:, None].to(tl.int64) * sxm
        w_ptr = W + offs_n[:, None].to(tl.int64) * swn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Every split runs k_per_split / BLOCK_K steps (a trip count the interpreter can run too);
        # the last split's steps past K load nothing and add exact zeros.
        for k0 in range(0, k_per_split, BLOCK_K):
            ks = k_start + k0 + offs_k
            x = tl.load(x_ptr + ks[None, :] * sxk, mask=(offs_m[:, None] < M) & (ks[None, :] < k_end), other=0.0)
            w = tl.load(w_ptr + ks[None, :] * swk, mask=(offs_n[:, None] < N) & (ks[None, :] < k_end), other=0.0)
            if UPCAST:
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            if IEEE:
                acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, tl.trans(w), acc)
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y_ptr = Y + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :] * syn
        if split == 1:
            if HAS_BIAS:
                acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=out_mask)
        else:
            mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
            tl.store(Work + pid_s.to(tl.int64) * M * N + mn, acc, mask=out_mask)
            if SERIAL:
                # The last program of this tile to arrive sums the splits in order 0, 1, ...
                tl.debug_barrier()
                tile = pid_n * num_m + pid_m
                arrived = tl.atomic_add(Count + tile, 1, sem="acq_rel", scope="gpu")
                if arrived == split - 1:
                    tl.debug_barrier()
                    total = tl.load(Work + mn, mask=out_mask, other=0.0, cache_modifier=".cg")
                    for s in range(1, split):
                        total += tl.load(Work + s * M * N + mn, mask=out_mask, other=0.0, cache_modifier=".cg")
                    if HAS_BIAS:
                        total += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
                    tl.store(y_ptr, total.to(Y.dtype.element_ty), mask=out_mask)
                    tl.store(Count + tile, 0)  # ready for the next call

    @triton.jit(do_not_specialize=["M"])
    def _mm_reduce_kernel(Work, Bias, Y, M, N, split, sym, syn, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The K splits of ``_mm_kernel`` summed in order 0, 1, ... (the serial path's sum)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        mn = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
        total = tl.load(Work + mn, mask=out_mask, other=0.0)
        for s in range(1, split):
            total += tl.load(Work + s * M * N + mn, mask=out_mask, other=0.0)
        if HAS_BIAS:
            total += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptr = Y + offs_m[:, None].to(tl.int64) * sym + offs_n[None, :] * syn
        tl.store(y_ptr, total.to(Y.dtype.element_ty), mask=out_mask)


_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 arrival counters (the serial split-K path resets them after use), or None
    when more are needed while a CUDA graph is being captured (then the two-kernel path runs)."""
    have = _counters.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _counters[device] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


def matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [M, K], weight: [N, K], bias: [N] or None -> x @ weight.T + bias: [M, N] in x's dtype.
    Each row's value depends on that row and the weights only."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"matmul: x [M, K] and weight [N, K] expected, got {tuple(x.shape)}, {tuple(weight.shape)}")
    if x.dtype != weight.dtype:
        raise ValueError(f"matmul: x is {x.dtype} but weight is {weight.dtype}")
    m, k = x.shape
    n = weight.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
    cfg = gemm_config(n, k, x.dtype)
    upcast = _INTERPRET or x.dtype == torch.float32
    ieee = x.dtype == torch.float32 or _INTERPRET
    has_bias = bias is not None
    bias_arg = bias if has_bias else y
    rows = m if cfg.split == 1 else MAX_ROWS
    for r0 in range(0, m, rows):
        xs, ys = x[r0:r0 + rows], y[r0:r0 + rows]
        mc = xs.shape[0]
        num_m, num_n = triton.cdiv(mc, cfg.block_m), triton.cdiv(n, cfg.block_n)
        work = count = y
        serial = False
        if cfg.split > 1:
            work = torch.empty(cfg.split, mc, n, dtype=torch.float32, device=x.device)
            if GEMM["serial"]:
                counters = _tile_counters(x.device, num_m * num_n)
                if counters is not None:
                    count, serial = counters, True
        grid = (num_m * num_n * cfg.split,)
        _mm_kernel[grid](xs, weight, bias_arg, ys, work, count, mc, n, k, cfg.k_per_split, cfg.split,
                         xs.stride(0), xs.stride(1), weight.stride(0), weight.stride(1), ys.stride(0), ys.stride(1),
                         HAS_BIAS=has_bias, SERIAL=serial, UPCAST=upcast, IEEE=ieee, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.warps, num_stages=cfg.stages)
        if cfg.split > 1 and not serial:
            _mm_reduce_kernel[(num_m, num_n)](work, bias_arg, ys, mc, n, cfg.split, ys.stride(0), ys.stride(1),
                                               HAS_BIAS=has_bias, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                               num_warps=4)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` on the batch-invariant matmul: x [..., K] -> [..., N]."""
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    return matmul(flat, weight, bias).view(*lead, weight.shape[0])


def matmul_twin(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same function in plain torch: fp32 (fp64 for fp64) products, cast back."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(acc) @ weight.to(acc).T
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


# --- RMSNorm -----------------------------------------------------------------------------------
if HAVE_TRITON:

    @triton.jit
    def _rms_kernel(X, R, W, Y, S, D, eps, sx, sr, sy, ss, HAS_RES: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_D)
        inside = offs < D
        x = tl.load(X + row * sx + offs, mask=inside, other=0.0).to(tl.float32)
        if HAS_RES:  # x + residual, rounded to the storage dtype as the eager add is, then normed
            total = (x + tl.load(R + row * sr + offs, mask=inside, other=0.0).to(tl.float32)).to(S.dtype.element_ty)
            tl.store(S + row * ss + offs, total, mask=inside)
            x = total.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        w = tl.load(W + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(Y + row * sy + offs, (x * rstd * w).to(Y.dtype.element_ty), mask=inside)


def _rows(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return flat if flat.stride(-1) == 1 else flat.contiguous()


def _norm_launch(x, residual, weight, eps):
    d = x.shape[-1]
    flat = _rows(x)
    res = _rows(residual) if residual is not None else flat
    out = torch.empty(flat.shape, dtype=x.dtype, device=x.device)
    total = torch.empty_like(out) if residual is not None else out
    if flat.shape[0]:
        block = max(16, triton.next_power_of_2(d))
        warps = 4 if block <= 1024 else 8 if block <= 8192 else 16
        _rms_kernel[(flat.shape[0],)](flat, res, weight, out, total, d, eps, flat.stride(0), res.stride(0),
                                      out.stride(0), total.stride(0), HAS_RES=residual is not None,
                                      BLOCK_D=block, num_warps=warps)
    return total.view(x.shape), out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, fp32 inside, one row per program."""
    return _norm_launch(x, None, weight, eps)[1]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x + residual, RMSNorm of it), in one kernel; the sum is rounded to x's dtype first."""
    return _norm_launch(x, residual, weight, eps)


def rms_norm_twin(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm_twin(x, residual, weight, eps):
    total = x + residual
    return total, F.rms_norm(total, weight.shape, weight, eps)


# --- attention ---------------------------------------------------------------------------------
KV_SPLIT = 512  # keys a program reduces (a multiple of ATTN_BLOCK_N); fixed, never from the batch
ATTN_BLOCK_M = 64
ATTN_BLOCK_N = 64
# Query groups a mask may name (``masked_keys``): group ids at or past the last share it, which
# costs invariance between them, never correctness (the mask still applies to every query).
QUERY_GROUPS = 24


@dataclass
class MaskedKeys:
    """An additive mask ([B, 1, T, C], 0 or -inf) with the keys each group of queries may see.

    The queries of a row fall into ``groups`` groups, each of queries that see the same keys
    (``masked_keys`` groups them by attention segment). ``order`` [B, G, C] int32: per row and
    group, the keys some query of the group sees first, in index order; ``count`` [B, G] int32;
    ``perm`` [B, T] int32: the row's queries sorted by group (stable); ``sorted_group`` [B, T]
    int32: the group of each sorted query (both None with one group a row: the queries in order).
    A query's keys are thus its own visible keys in index order, split at fixed counts, wherever
    they sit in the row and whatever other queries see."""

    additive: torch.Tensor
    order: torch.Tensor
    count: torch.Tensor
    perm: torch.Tensor | None = None
    sorted_group: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.order.dim() == 2:  # one group a row, given as order [B, C] and count [B]
            self.order, self.count = self.order[:, None], self.count[:, None]

    @property
    def groups(self) -> int:
        return self.order.shape[1]


def key_order(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """visible: [..., C] bool (a key some query may see) -> (order [..., C] int32, the visible
    keys first and in index order; count [...] int32)."""
    order = torch.argsort((~visible).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return order, visible.sum(-1, dtype=torch.int32)


def masked_keys(mask: torch.Tensor, additive: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> MaskedKeys:
    """From a boolean mask [B, 1, T, C] (True: may attend), its additive form and ``groups``
    [B, T] (ints >= 0: the queries of a group see the same keys, as queries of one attention
    segment do; ids past ``QUERY_GROUPS - 1`` share the last group). None: one group a row, the
    keys some query of the row sees."""
    b, _, t, c = mask.shape
    if additive is None:
        additive = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill_(~mask, float("-inf"))
    if groups is None:
        order, count = key_order(mask.any(2)[:, 0])
        return MaskedKeys(additive, order[:, None], count[:, None])
    groups = groups.clamp(0, QUERY_GROUPS - 1)
    visible = torch.zeros(b, QUERY_GROUPS, c, dtype=torch.uint8, device=mask.device)
    visible.scatter_reduce_(1, groups[:, :, None].expand(b, t, c), mask[:, 0].to(torch.uint8), "amax")
    order, count = key_order(visible.bool())
    perm = torch.argsort(groups, dim=1, stable=True)
    return MaskedKeys(additive, order, count, perm.to(torch.int32), groups.gather(1, perm).to(torch.int32))


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["T", "C"])
    def _attn_kernel(Q, K, V, Mask, Order, Count, Perm, Group, Part, Stat, T, C, H, G, group, n_split, qk_scale,
                     sqb, sqh, sqt, skb, skh, skc, svb, svh, svc, smb, smh, smt, smc,
                     HAS_ORDER: tl.constexpr, GROUPED: tl.constexpr, UPCAST: tl.constexpr, D: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
        """One program: BLOCK_M of a row's queries sorted by group, one head, one split of the
        keys; for each group among its queries, that group's keys of the split."""
        LOG2E: tl.constexpr = 1.4426950408889634
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        pid_s = tl.program_id(2)
        b = bh // H
        h = bh % H
        hk = h // group
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # sorted query positions
        pos_in = pos < T
        if GROUPED:
            rows = tl.load(Perm + b.to(tl.int64) * T + pos, mask=pos_in, other=0)
            groups = tl.load(Group + b.to(tl.int64) * T + pos, mask=pos_in, other=-1)
            g_lo = tl.min(tl.where(pos_in, groups, 2147483647), axis=0)
            g_hi = tl.max(groups, axis=0)
        else:
            rows = pos
            groups = tl.where(pos_in, 0, -1)
            g_lo = 0
            g_hi = 0
        offs_d = tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + rows[:, None] * sqt + offs_d[None, :],
                    mask=pos_in[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
        k_base = K + b.to(tl.int64) * skb + hk * skh
        v_base = V + b.to(tl.int64) * svb + hk * svh
        start = pid_s * SPLIT
        out_row = (bh.to(tl.int64) * n_split + pid_s) * T + pos
        for g in range(g_lo, g_hi + 1):
            mine = groups == g
            count = C
            if HAS_ORDER:
                count = tl.load(Count + b * G + g)
            if (start < count) & (tl.sum(mine.to(tl.int32), axis=0) > 0):
                end = tl.minimum(start + SPLIT, count)
                m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                l_i = tl.zeros((BLOCK_M,), tl.float32)
                acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
                for n0 in range(0, SPLIT, BLOCK_N):  # past ``end``: nothing loaded, exact no-ops
                    offs_n = start + n0 + tl.arange(0, BLOCK_N)
                    valid = offs_n < end
                    if HAS_ORDER:
                        keys = tl.load(Order + (b * G + g).to(tl.int64) * C + offs_n, mask=valid, other=0)
                    else:
                        keys = offs_n
                    k = tl.load(k_base + keys[:, None].to(tl.int64) * skc + offs_d[None, :],
                                mask=valid[:, None] & d_in[None, :], other=0.0)
                    v = tl.load(v_base + keys[:, None].to(tl.int64) * svc + offs_d[None, :],
                                mask=valid[:, None] & d_in[None, :], other=0.0)
                    if UPCAST:
                        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
                    else:
                        s = tl.dot(q, tl.trans(k))
                    # The mask is always read (a zero with zero strides when there is none): a kernel
                    # compiled without it would contract these multiply-adds differently.
                    bias = tl.load(Mask + b.to(tl.int64) * smb + h * smh + rows[:, None].to(tl.int64) * smt
                                   + keys[None, :].to(tl.int64) * smc,
                                   mask=pos_in[:, None] & valid[None, :], other=0.0)
                    s = s * qk_scale + bias.to(tl.float32) * LOG2E
                    s = tl.where(valid[None, :], s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp2(m_i - m_use)
                    p = tl.exp2(s - m_use[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    if UPCAST:
                        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
                    else:
                        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
                    m_i = m_new
                tl.store(Part + out_row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=mine[:, None])
                tl.store(Stat + out_row * 2, m_i, mask=mine)
                tl.store(Stat + out_row * 2 + 1, l_i, mask=mine)

    @triton.jit(do_not_specialize=["T", "C"])
    def _attn_combine_kernel(Part, Stat, Count, Perm, Group, Out, T, C, H, G, n_split, sob, sot, soh,
                             HAS_ORDER: tl.constexpr, GROUPED: tl.constexpr, D: tl.constexpr,
                             BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
        """Each query's splits, summed in order (those past its group's keys are not read)."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        pos = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows_in = pos < T
        if GROUPED:
            rows = tl.load(Perm + b.to(tl.int64) * T + pos, mask=rows_in, other=0)
            groups = tl.load(Group + b.to(tl.int64) * T + pos, mask=rows_in, other=0)
            count = tl.load(Count + b * G + groups, mask=rows_in, other=0)
        elif HAS_ORDER:
            rows = pos
            count = tl.where(rows_in, tl.load(Count + b), 0)
        else:
            rows = pos
            count = tl.where(rows_in, C, 0)
        used = tl.cdiv(count, SPLIT)
        offs_d = tl.arange(0, BLOCK_D)
        m_tot = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for s in range(0, n_split):
            row = (bh.to(tl.int64) * n_split + s) * T + pos
            here = rows_in & (s < used)
            m_tot = tl.maximum(m_tot, tl.load(Stat + row * 2, mask=here, other=float("-inf")))
        m_use = tl.where(m_tot == float("-inf"), 0.0, m_tot)
        l_tot = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for s in range(0, n_split):
            row = (bh.to(tl.int64) * n_split + s) * T + pos
            here = rows_in & (s < used)
            w = tl.exp2(tl.load(Stat + row * 2, mask=here, other=float("-inf")) - m_use)
            l_tot += tl.load(Stat + row * 2 + 1, mask=here, other=0.0) * w
            acc += tl.load(Part + row[:, None] * BLOCK_D + offs_d[None, :], mask=here[:, None], other=0.0) * w[:, None]
        out = acc / tl.where(l_tot == 0.0, 1.0, l_tot)[:, None]
        tl.store(Out + b.to(tl.int64) * sob + rows[:, None].to(tl.int64) * sot + h * soh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=rows_in[:, None] & (offs_d[None, :] < D))


_zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element zero (kept, except one made while a CUDA graph is captured: the graph's
    memory pool may hand its storage to another tensor once the graph is gone)."""
    key = (device, dtype)
    if key not in _zeros:
        zero = torch.zeros(1, dtype=dtype, device=device)
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return zero
        _zeros[key] = zero
    return _zeros[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | MaskedKeys | None = None) -> torch.Tensor:
    """Softmax attention, batch-invariant: q [B, H, T, D]; k, v [B, Hkv, C, D] (H a multiple of
    Hkv; any strides with a unit last one); mask: additive, broadcastable to [B, H, T, C] (one
    group of queries a row), or a ``MaskedKeys``, or None (every key). Scale 1/sqrt(D), as
    SDPA's default. Returns [B, H, T, D] in q's dtype (a view of a [B, T, H, D] tensor, so a
    transpose back is free)."""
    b, h, t, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    if h % hkv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit")
    if isinstance(mask, torch.Tensor):
        mask = masked_keys((mask > float("-inf")).expand(b, -1, t, c).any(1, keepdim=True), mask)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    if b * h * t == 0:
        return out.transpose(1, 2)
    block_d = max(16, triton.next_power_of_2(d))
    n_split = max(1, triton.cdiv(c, KV_SPLIT))
    part = torch.empty(b * h * n_split * t, block_d, dtype=torch.float32, device=q.device)
    stat = torch.empty(b * h * n_split * t, 2, dtype=torch.float32, device=q.device)
    has_mask = mask is not None
    if has_mask:
        full = mask.additive.expand(b, mask.additive.shape[1], t, c)
        msb, msh, mst, msc = full.stride()
        if full.shape[1] == 1:
            msh = 0
        mask_arg, order, count, g = full, mask.order.contiguous(), mask.count.contiguous(), mask.groups
        grouped = mask.perm is not None
        perm, groups = (mask.perm.contiguous(), mask.sorted_group.contiguous()) if grouped else (count, count)
    else:  # every key: a zero mask read at one address, so the arithmetic is the masked kernel's
        msb = msh = mst = msc = 0
        mask_arg = _zero(q.device, q.dtype)
        order = count = perm = groups = q
        g, grouped = 1, False
    grid = (triton.cdiv(t, ATTN_BLOCK_M), b * h, n_split)
    upcast = _INTERPRET or q.dtype == torch.float32
    _attn_kernel[grid](q, k, v, mask_arg, order, count, perm, groups, part, stat, t, c, h, g, h // hkv, n_split,
                       (1.0 / math.sqrt(d)) * 1.4426950408889634,
                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                       v.stride(0), v.stride(1), v.stride(2), msb, msh, mst, msc,
                       HAS_ORDER=has_mask, GROUPED=grouped, UPCAST=upcast, D=d, BLOCK_D=block_d,
                       BLOCK_M=ATTN_BLOCK_M, BLOCK_N=ATTN_BLOCK_N, SPLIT=KV_SPLIT, num_warps=4, num_stages=2)
    _attn_combine_kernel[(triton.cdiv(t, ATTN_BLOCK_M), b * h)](
        part, stat, count, perm, groups, out, t, c, h, g, n_split, out.stride(0), out.stride(1), out.stride(2),
        HAS_ORDER=has_mask, GROUPED=grouped, D=d, BLOCK_D=block_d, BLOCK_M=ATTN_BLOCK_M, SPLIT=KV_SPLIT,
        num_warps=4)
    return out.transpose(1, 2)


def attention_twin(q, k, v, mask=None) -> torch.Tensor:
    """The same function in plain torch (fp32 softmax), [B, H, T, D]."""
    if isinstance(mask, MaskedKeys):
        mask = mask.additive
    h, hkv = q.shape[1], k.shape[1]
    k, v = (x.repeat_interleave(h // hkv, dim=1).float() for x in (k, v))
    scores = q.float() @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask.float()
    return (torch.softmax(scores, -1) @ v).to(q.dtype)
