"""The KV pool of a batching engine: one preallocated row of slots per request being decoded.

A row holds one request's keys and values in a fixed geometry: its prompt in slots
``[0, max_prompt)`` (right-padded), its canvas in ``[max_prompt, max_prompt + max_canvas)``
(column c in slot ``max_prompt + c``), and one scratch slot last, where the padding queries of a
batched call write what no query ever reads. The rows are allocated once, as many as free device
memory holds (``rows_that_fit``) up to the engine's cap, so admission asks for a free row and a
request that can never fit (a prompt or canvas longer than a row) is refused by name.

Live requests occupy rows ``[0, n)``: a batched step over every live row reads the pool as a view
(no copy), and a CUDA graph captured for a batch bucket reads the same addresses whatever the
requests. When a request leaves, the last live row moves into its place (``move``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paradec.errors import ConfigError
from paradec.models.transformer_config import TransformerConfig


@dataclass(frozen=True)
class RowGeometry:
    """Slots of one pool row: max_prompt prompt slots, max_canvas canvas slots, one scratch."""

    max_prompt: int
    max_canvas: int

    @property
    def slots(self) -> int:
        return self.max_prompt + self.max_canvas + 1

    @property
    def scratch(self) -> int:
        return self.slots - 1


def row_bytes(cfg: TransformerConfig, geometry: RowGeometry, dtype: torch.dtype) -> int:
    """Bytes of one pool row's keys and values."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * cfg.num_kv_heads * geometry.slots * cfg.head_dim * itemsize


def rows_that_fit(cfg: TransformerConfig, geometry: RowGeometry, dtype: torch.dtype, device: torch.device,
                  memory_fraction: float) -> int | None:
    """Rows that ``memory_fraction`` of the device's free memory holds (None on a CPU: no limit
    worth measuring)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * memory_fraction) // row_bytes(cfg, geometry, dtype)


class KVPool:
    """kv: [L, 2, R, Hkv, S, D], R rows of S slots (``RowGeometry``), zeroed (a masked key must
    hold a finite value: its weight is zero, and zero times a NaN is not)."""

    def __init__(self, cfg: TransformerConfig, geometry: RowGeometry, rows: int, like: torch.Tensor):
        if rows < 1:
            raise ConfigError(f"the KV pool holds no row of {geometry.slots} slots "
                              f"({row_bytes(cfg, geometry, like.dtype) / 2**20:.0f} MiB); free device memory "
                              "or lower max_prompt_tokens / max_canvas_tokens")
        self.geometry = geometry
        try:
            self.kv = like.new_zeros(cfg.num_layers, 2, rows, cfg.num_kv_heads, geometry.slots, cfg.head_dim)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            raise ConfigError(f"the KV pool of {rows} rows of {geometry.slots} slots "
                              f"({rows * row_bytes(cfg, geometry, like.dtype) / 2**30:.1f} GiB) could not be allocated "
                              f"({type(error).__name__}); lower max_batch, kv_rows or max_prompt_tokens / "
                              "max_canvas_tokens") from error

    @property
    def rows(self) -> int:
        return self.kv.shape[2]

    def move(self, source: int, target: int) -> None:
        """Row ``source``'s keys and values into row ``target``."""
        self.kv[:, :, target].copy_(self.kv[:, :, source])
