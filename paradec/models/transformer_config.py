"""The shape of the diffusion transformer: sizes, heads, rotary base, and which checkpoint
tensors its fused projections hold."""

from __future__ import annotations

from dataclasses import dataclass

from paradec.errors import InputError


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
