"""LLaDA (GSAI-ML/LLaDA-8B-*): config translation and checkpoint parameter names.

LLaDA's published code is an OLMo-style ``LLaDAModelLM`` wrapping ``model.transformer`` with
llama-type blocks: q/k/v/attn_out projections, SwiGLU as silu(ff_proj(x)) * up_proj(x) then
ff_out, RMSNorm, RoPE, no causal mask, an untied output head ``transformer.ff_out`` unless
``weight_tying``. Logits are not shifted: position i predicts token i.
"""

from __future__ import annotations

from paradec.errors import CheckpointError, require_key as _get
from paradec.models.transformer_config import TransformerConfig

MODEL_TYPES = ("llada",)
SHIFT_LOGITS = False

# Options of the OLMo-style config that this layer does not implement, with the value it needs.
_REQUIRED = {
    "block_type": "llama",
    "layer_norm_type": "rms",
    "alibi": False,
    "rope": True,
    "include_bias": False,
    "input_emb_norm": False,
    "attention_layer_norm": False,
    "block_group_size": 1,
}


def transformer_config(config: dict, source: str) -> TransformerConfig:
    for key, needed in _REQUIRED.items():
        if key in config and config[key] != needed:
            raise CheckpointError(f"{source}: {key} = {config[key]!r} is not supported (paradec needs {needed!r})")
    if config.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise CheckpointError(f"{source}: activation_type = {config['activation_type']!r} is not supported (silu)")
    d_model = _get(config, "d_model", source)
    n_heads = _get(config, "n_heads", source)
    hidden = config.get("mlp_hidden_size") or config.get("mlp_ratio", 4) * d_model
    return TransformerConfig(
        vocab_size=config.get("embedding_size") or _get(config, "vocab_size", source),
        hidden_size=d_model,
        intermediate_size=hidden,
        num_layers=_get(config, "n_layers", source),
        num_heads=n_heads,
        num_kv_heads=config.get("n_kv_heads") or n_heads,
        rope_theta=float(config.get("rope_theta", 10000.0)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        max_length=_get(config, "max_sequence_length", source),
        qkv_bias=bool(config.get("include_qkv_bias", False)),
        tie_embeddings=bool(config.get("weight_tying", False)),
        logit_scale=d_model**-0.5 if config.get("scale_logits") else 1.0,
    )


def checkpoint_names(cfg: TransformerConfig) -> dict[str, tuple[str, int]]:
    """Checkpoint parameter name -> (paradec parameter, part); q/k/v are parts 0/1/2 of the
    fused qkv_proj, gate/up parts 0/1 of gate_up_proj; other parameters are whole (part 0)."""
    names = {
        "model.transformer.wte.weight": ("embed.weight", 0),
        "model.transformer.ln_f.weight": ("norm.weight", 0),
    }
    if not cfg.tie_embeddings:
        names["model.transformer.ff_out.weight"] = ("lm_head.weight", 0)
    for i in range(cfg.num_layers):
        src, dst = f"model.transformer.blocks.{i}.", f"layers.{i}."
        names |= {
            src + "attn_norm.weight": (dst + "attn_norm.weight", 0),
            src + "ff_norm.weight": (dst + "mlp_norm.weight", 0),
            src + "attn_out.weight": (dst + "attn.o_proj.weight", 0),
            src + "ff_proj.weight": (dst + "mlp.gate_up_proj.weight", 0),
            src + "up_proj.weight": (dst + "mlp.gate_up_proj.weight", 1),
            src + "ff_out.weight": (dst + "mlp.down_proj.weight", 0),
        }
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            names[src + f"{proj}.weight"] = (dst + "attn.qkv_proj.weight", part)
            if cfg.qkv_bias:
                names[src + f"{proj}.bias"] = (dst + "attn.qkv_proj.bias", part)
    return names
