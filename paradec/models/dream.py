"""Dream (Dream-org/Dream-v0-*-7B): config translation and checkpoint parameter names.

Dream keeps Qwen2.5's layout and names (``model.layers.{i}.self_attn.q_proj`` …, ``lm_head``):
grouped-query attention, q/k/v bias, RoPE with θ from config, no causal mask. It was trained
from an AR model and keeps its shift: the logits at position i - 1 predict token i.
"""

from __future__ import annotations

from paradec.errors import CheckpointError, require_key as _get
from paradec.models.transformer_config import TransformerConfig

MODEL_TYPES = ("dream",)
SHIFT_LOGITS = True


def transformer_config(config: dict, source: str) -> TransformerConfig:
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act = {config['hidden_act']!r} is not supported (silu)")
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{source}: use_sliding_window = true is not supported")
    if config.get("rope_scaling"):
        raise CheckpointError(f"{source}: rope_scaling = {config['rope_scaling']!r} is not supported")
    n_heads = _get(config, "num_attention_heads", source)
    return TransformerConfig(
        vocab_size=_get(config, "vocab_size", source),
        hidden_size=_get(config, "hidden_size", source),
        intermediate_size=_get(config, "intermediate_size", source),
        num_layers=_get(config, "num_hidden_layers", source),
        num_heads=n_heads,
        num_kv_heads=config.get("num_key_value_heads") or n_heads,
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_length=_get(config, "max_position_embeddings", source),
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def checkpoint_names(cfg: TransformerConfig) -> dict[str, tuple[str, int]]:
    """Checkpoint parameter name -> (paradec parameter, part); q/k/v are parts 0/1/2 of the
    fused qkv_proj, gate/up parts 0/1 of gate_up_proj; other parameters are whole (part 0)."""
    names = {"model.embed_tokens.weight": ("embed.weight", 0), "model.norm.weight": ("norm.weight", 0)}
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = ("lm_head.weight", 0)
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names |= {
            src + "input_layernorm.weight": (dst + "attn_norm.weight", 0),
            src + "post_attention_layernorm.weight": (dst + "mlp_norm.weight", 0),
            src + "self_attn.o_proj.weight": (dst + "attn.o_proj.weight", 0),
            src + "mlp.gate_proj.weight": (dst + "mlp.gate_up_proj.weight", 0),
            src + "mlp.up_proj.weight": (dst + "mlp.gate_up_proj.weight", 1),
            src + "mlp.down_proj.weight": (dst + "mlp.down_proj.weight", 0),
        }
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            names[src + f"self_attn.{proj}.weight"] = (dst + "attn.qkv_proj.weight", part)
            names[src + f"self_attn.{proj}.bias"] = (dst + "attn.qkv_proj.bias", part)
    return names
