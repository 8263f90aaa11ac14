"""Random numbers for sampled decoding, drawn on the device from a counter-based hash.

A position's numbers are a function of (request seed, group, the group's step, the position's
offset in its group's body, salt) and nothing else — not the batch, the rank, the other groups or
the step's shape — so a request decodes the same alone, batched or spread over ranks (DESIGN.md
contract 3), and a step that draws them has static shapes and no host work, so it can be
captured in a CUDA graph like a greedy one.

The hash is SplitMix64 (Steele, Lea and Flood, 2014): a stream key is the mixed chain of the
five key parts, and the number at counter i of a stream is mix(key + (i + 1) * golden), SplitMix64's
own sequence from that key. It runs as plain int64 tensor arithmetic (multiplication wraps
modulo 2^64 on every device torch supports; right shifts are made logical with a mask), so the
CPU and a GPU draw the same bits. ``uniform_reference`` is the same function in Python integers,
which the tests compare against.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB

# Salts: which draw of a step a stream feeds.
TOKENS = 0  # the Gumbel-max token draw (and rank_temperature's ranking noise, at the mask id)
ORDER = 1  # ``random`` order's priorities


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 bit patterns."""
    x = (x ^ _shift_right(x, 30)) * _signed(_MIX1)
    x = (x ^ _shift_right(x, 27)) * _signed(_MIX2)
    return x ^ _shift_right(x, 31)


def stream_keys(seed: torch.Tensor, group: torch.Tensor, step: torch.Tensor, offset: torch.Tensor,
                salt: int) -> torch.Tensor:
    """[N] int64 stream keys; every argument [N] int64 (or broadcastable) on one device."""
    key = _mix(seed + _signed(_GOLDEN))
    for part in (group, step, offset):
        key = _mix(key + part)
    return _mix(key + salt)


def uniform(seed: torch.Tensor, group: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, salt: int,
            width: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[N, width] numbers in the open interval (0, 1): row n is counters 0..width-1 of stream
    (seed[n], group[n], step[n], offset[n], salt). 53 random bits each (float64's mantissa), so
    log(-log u) never meets 0 or 1."""
    key = stream_keys(seed, group, step, offset, salt)  # [N]
    counter = torch.arange(1, width + 1, dtype=torch.long, device=key.device) * _signed(_GOLDEN)  # [W]
    bits = _shift_right(_mix(key[:, None] + counter[None]), 11)  # [N, W] in [0, 2^53)
    return ((bits.double() + 0.5) * 2.0**-53).to(dtype)


def uniform_reference(seed: int, group: int, step: int, offset: int, salt: int, width: int) -> list[float]:
    """``uniform`` for one row, in Python integers (the tests' reference)."""

    def mix(x: int) -> int:
        x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
        x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
        return x ^ (x >> 31)

    key = mix((seed + _GOLDEN) & _MASK64)
    for part in (group, step, offset, salt):
        key = mix((key + part) & _MASK64)
    return [((mix((key + i * _GOLDEN) & _MASK64) >> 11) + 0.5) * 2.0**-53 for i in range(1, width + 1)]
