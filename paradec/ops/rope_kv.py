"""Rotary embedding of q and k fused with writing k and v into a pool of KV rows: one Triton
kernel for what the batching engine's attention layers did in three steps (the rotation, then
an indexed assignment of k and of v into each column's row and slot).

Profiled on an H200 (a lone LLaDA-8B request in the engine, and 8 in lockstep; benchmarks/
RESULTS.md): the compiled rotation took 33 ms of the lone request's 807 ms of kernels and 395
of 3,883 ms at 8, the indexed assignments (``index_put_``) 42 and 228 ms; both move a few KB a
column and layer, far below the memory's rate.

``rope_kv`` computes the rotation as ``paradec.models.layers.apply_rotary`` does (fp32, the two
halves of D) and rounds to the input's dtype; its plain-torch twin is ``rope_kv_twin``. A leaf
module: it imports nothing from paradec.

On by default on CUDA; ``PARADEC_ROPE_KV=0`` routes back to the compiled rotation and indexed
assignments (the A/B). On the H200, 8 rows in lockstep: 1.83 -> 2.05 requests/s (RESULTS.md,
session 16). Multiply-adds are not contracted (``enable_fp_fusion=False``), so fp32 results equal
the twin's bit for bit on any Triton version.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = tl = None
    HAVE_TRITON = False

# Where ``usable`` routes; the tests add "cpu" to run the kernel in Triton's interpreter.
DEVICES = {"cuda"} if os.environ.get("PARADEC_ROPE_KV", "1") != "0" else set()
BLOCK_H = 16  # heads a program


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(x: torch.Tensor) -> bool:
    """Whether ``rope_kv`` can run on ``x``: Triton importable, a device in ``DEVICES``, a dtype in
    ``DTYPES`` (the rotation runs in fp32) and no autograd."""
    return HAVE_TRITON and x.device.type in DEVICES and x.dtype in DTYPES and not torch.is_grad_enabled()


if HAVE_TRITON:

    @triton.jit(do_not_specialize=["T"])
    def _rope_kv_kernel(QKV, Cos, Sin, Q, K, V, Rows, Slots, T, H, HKV,
                        sxb, sxt, sxh, scb, sct, ssb, sst, sqb, sqt, sqh, skr, skh, sks, svr, svh, svs,
                        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK: tl.constexpr, OWN_ROWS: tl.constexpr):
        """One program: one column's BLOCK heads of the fused projection (q, k, then v heads).
        ``OWN_ROWS``: a column's row is its batch row (no Rows read)."""
        col = tl.program_id(0)
        b = (col // T).to(tl.int64)
        t = (col % T).to(tl.int64)
        heads = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, BLOCK_HALF)
        d_in = d < HALF
        live = (heads < H + 2 * HKV)[:, None] & d_in[None, :]
        x_at = QKV + b * sxb + t * sxt + heads[:, None].to(tl.int64) * sxh + d[None, :]
        x1 = tl.load(x_at, mask=live, other=0.0)
        x2 = tl.load(x_at + HALF, mask=live, other=0.0)
        c_at, s_at = Cos + b * scb + t * sct + d, Sin + b * ssb + t * sst + d
        cos1, cos2 = tl.load(c_at, mask=d_in)[None, :], tl.load(c_at + HALF, mask=d_in)[None, :]
        sin1, sin2 = tl.load(s_at, mask=d_in)[None, :], tl.load(s_at + HALF, mask=d_in)[None, :]
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        turned = (heads < H + HKV)[:, None]  # q and k heads rotate, v heads do not
        o1 = tl.where(turned, (a1 * cos1 + (-a2) * sin1).to(x1.dtype), x1)
        o2 = tl.where(turned, (a2 * cos2 + a1 * sin2).to(x2.dtype), x2)
        is_q = (heads < H)[:, None] & live
        q_at = Q + b * sqb + t * sqt + heads[:, None].to(tl.int64) * sqh + d[None, :]
        tl.store(q_at, o1, mask=is_q)
        tl.store(q_at + HALF, o2, mask=is_q)
        if OWN_ROWS:
            row = b
        else:
            row = tl.load(Rows + col).to(tl.int64)
        slot = tl.load(Slots + col).to(tl.int64)
        is_k = ((heads >= H) & (heads < H + HKV))[:, None] & live
        k_at = K + row * skr + (heads - H)[:, None].to(tl.int64) * skh + slot * sks + d[None, :]
        tl.store(k_at, o1, mask=is_k)
        tl.store(k_at + HALF, o2, mask=is_k)
        is_v = (heads >= H + HKV)[:, None] & live
        v_at = V + row * svr + (heads - H - HKV)[:, None].to(tl.int64) * svh + slot * svs + d[None, :]
        tl.store(v_at, o1, mask=is_v)
        tl.store(v_at + HALF, o2, mask=is_v)


def _check(qkv, cos, sin, keys, values, rows, slots, heads, kv_heads) -> None:
    b, t, n, d = qkv.shape
    tensors = (qkv, cos, sin, keys, values, slots) + (() if rows is None else (rows,))
    if n != heads + 2 * kv_heads or d % 2 or cos.shape[-1] != d or sin.shape != cos.shape \
            or keys.shape != values.shape or keys.shape[1] != kv_heads or keys.shape[3] != d \
            or (rows is not None and rows.shape != (b, t)) or slots.shape != (b, t):
        raise ValueError(f"rope_kv: qkv {tuple(qkv.shape)} ({heads} + 2 x {kv_heads} heads), cos "
                         f"{tuple(cos.shape)}, sin {tuple(sin.shape)}, keys {tuple(keys.shape)}, values "
                         f"{tuple(values.shape)}, rows {None if rows is None else tuple(rows.shape)}, "
                         f"slots {tuple(slots.shape)} do not fit")
    if any(x.stride(-1) != 1 for x in tensors[:5]) or len({x.device for x in tensors}) > 1:
        raise ValueError("rope_kv: qkv, cos, sin, keys and values need a unit last stride, and every "
                         "tensor one device")


def rope_kv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
            rows: torch.Tensor | None, slots: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """qkv: [B, T, H + 2 Hkv, D], the fused projection's heads (any strides, a unit last one);
    cos, sin: [B, 1, T, D] fp32 (``RotaryEmbedding``); keys, values: [R, Hkv, S, D] (a pool
    layer's rows, any strides with a unit last one); rows, slots: [B, T], the row and slot each
    column's k and v go to (rows None: row b for batch row b). Rows and slots must lie in the
    pool: as in any kernel, they are not bounds-checked. Writes the rotated k and the v there;
    returns the rotated q, [B, H, T, D] (contiguous, as attention kernels take it)."""
    _check(qkv, cos, sin, keys, values, rows, slots, heads, kv_heads)
    b, t, n, d = qkv.shape
    q = qkv.new_empty(b, heads, t, d)
    if b * t == 0:
        return q
    cos, sin = cos.expand(b, 1, t, d), sin.expand(b, 1, t, d)
    slots = slots.contiguous()
    own = rows is None
    rows = slots if own else rows.contiguous()  # (own rows: a placeholder pointer, never read)
    with torch.cuda.device(qkv.device) if qkv.is_cuda else nullcontext():  # the tensors' GPU, not the current one
        _launch(qkv, cos, sin, q, keys, values, rows, slots, heads, kv_heads, own)
    return q


def _launch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
            own: bool) -> None:
    b, t, n, d = qkv.shape
    _rope_kv_kernel[(b * t, triton.cdiv(n, BLOCK_H))](
        qkv, cos, sin, q, keys, values, rows, slots, t, heads, kv_heads,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        q.stride(0), q.stride(2), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0),
        values.stride(1), values.stride(2), HALF=d // 2, BLOCK_HALF=triton.next_power_of_2(d // 2), BLOCK=BLOCK_H,
        OWN_ROWS=own, num_warps=4, enable_fp_fusion=False)


def rope_kv_twin(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, rows: torch.Tensor | None, slots: torch.Tensor, heads: int,
                 kv_heads: int) -> torch.Tensor:
    """The same in plain torch: the rotation (fp32, rounded to qkv's dtype) and indexed
    assignments."""
    _check(qkv, cos, sin, keys, values, rows, slots, heads, kv_heads)
    if rows is None:
        rows = torch.arange(qkv.shape[0], device=slots.device)[:, None].expand(slots.shape)
    x = qkv[:, :, : heads + kv_heads].transpose(1, 2).float()  # [B, H + Hkv, T, D]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(qkv.dtype)
    keys[rows, :, slots] = rotated[:, heads:].transpose(1, 2)  # [B, T, Hkv, D]
    values[rows, :, slots] = qkv[:, :, heads + kv_heads:]
    return rotated[:, :heads]
