"""SwiGLU's activation, ``silu(gate) * up``, read straight from the MLP's fused gate/up
projection: one Triton kernel, a program per column and 1,024 features, no index arithmetic
per element.

Profiled on an H200 (benchmarks/RESULTS.md, session 16): the compiled ``silu_mul`` (inductor,
dynamic shapes, over the projection's two strided halves) took 209 of 3,645 kernel ms among 8
LLaDA-8B rows in the batching engine, about a third of the memory's rate.

``silu_mul`` computes in fp32 and rounds once to the input's dtype, as the compiled kernel does;
its plain-torch twin is ``silu_mul_twin``. Elementwise, so batch-invariant by construction. A
leaf module: it imports nothing from paradec. ``PARADEC_SWIGLU_KERNEL=0`` routes every call back
to the compiled or eager path (the A/B).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton ships with CUDA builds of torch
    triton = tl = None
    HAVE_TRITON = False

# Where ``usable`` routes; the tests add "cpu" to run the kernel in Triton's interpreter.
DEVICES = {"cuda"} if os.environ.get("PARADEC_SWIGLU_KERNEL", "1") != "0" else set()
BLOCK = 1024  # features a program


DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def usable(x: torch.Tensor) -> bool:
    """Whether ``silu_mul`` can run on ``x``: Triton importable, a device in ``DEVICES``, a dtype in
    ``DTYPES`` (the kernel computes in fp32) and no autograd."""
    return HAVE_TRITON and x.device.type in DEVICES and x.dtype in DTYPES and not torch.is_grad_enabled()


if HAVE_TRITON:

    @triton.jit
    def _silu_mul_kernel(X, Out, I, sx, so, BLOCK: tl.constexpr):
        """One program: BLOCK features of one column; gate at [0, I), up at [I, 2 I) of its line."""
        col = tl.program_id(0).to(tl.int64)
        f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = f < I
        gate = tl.load(X + col * sx + f, mask=live, other=0.0).to(tl.float32)
        up = tl.load(X + col * sx + I + f, mask=live, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(Out + col * so + f, out.to(Out.dtype.element_ty), mask=live)


def _halves(gate_up: torch.Tensor) -> int:
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} needs an even last dimension (gate, then up)")
    return gate_up.shape[-1] // 2


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [..., 2 I], gate then up -> [..., I], contiguous. Read in place when its lines have
    a unit last stride and lie one stride apart (a Linear's output, or a slice of its columns);
    any other layout is copied first."""
    inter = _halves(gate_up)
    out = gate_up.new_empty(*gate_up.shape[:-1], inter)
    if not out.numel():
        return out
    lines = gate_up.reshape(-1, 2 * inter)  # a view for a Linear's output: no copy
    if lines.stride(-1) != 1:
        lines = lines.contiguous()
    with torch.cuda.device(lines.device) if lines.is_cuda else nullcontext():  # the tensor's GPU, not the current one
        _silu_mul_kernel[(lines.shape[0], triton.cdiv(inter, BLOCK))](
            lines, out, inter, lines.stride(0), inter, BLOCK=BLOCK, num_warps=4)
    return out


def silu_mul_twin(gate_up: torch.Tensor) -> torch.Tensor:
    """The same in plain torch: fp32, rounded once to gate_up's dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)
