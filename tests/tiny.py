"""Tiny checkpoints the tests write themselves, in the published formats and parameter names.

The names and shapes here are written out independently of paradec's own name maps, so a
mistake in those maps shows up as a failed load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SPECIALS = ["<|endoftext|>", "<|mask|>", "<|eot_id|>", "<summary>"]
WORDS = [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz") + ["+", "-", "=", "?", ".", "the", "is"]


def write_tokenizer(root: Path, pad_token: str = "<|endoftext|>") -> dict[str, int]:
    """A word-level tokenizer saved as tokenizer.json + tokenizer_config.json; returns the vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + ["<unk>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        mask_token="<|mask|>",
        pad_token=pad_token,
        unk_token="<unk>",
        additional_special_tokens=["<|eot_id|>", "<summary>"],
    )
    fast.save_pretrained(root)
    return vocab


def llada_config(vocab: dict[str, int], **overrides) -> dict:
    config = {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "d_model": 64,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "mlp_hidden_size": 96,
        "vocab_size": 96,
        "embedding_size": 96,
        "max_sequence_length": 256,
        "rope": True,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
        "mask_token_id": vocab["<|mask|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    return config | overrides


def dream_config(vocab: dict[str, int], **overrides) -> dict:
    config = {
        "model_type": "Dream",
        "architectures": ["DreamModel"],
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 96,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "mask_token_id": vocab["<|mask|>"],
        "eos_token_id": vocab["<|endoftext|>"],
        "pad_token_id": vocab["<|endoftext|>"],
    }
    return config | overrides


def llada_weights(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    d, h, v = config["d_model"], config["mlp_hidden_size"], config["embedding_size"]
    kv = config["n_kv_heads"] * d // config["n_heads"]
    shapes = {"model.transformer.wte.weight": (v, d), "model.transformer.ln_f.weight": (d,)}
    if not config.get("weight_tying"):
        shapes["model.transformer.ff_out.weight"] = (v, d)
    for i in range(config["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        shapes |= {
            p + "attn_norm.weight": (d,), p + "ff_norm.weight": (d,),
            p + "q_proj.weight": (d, d), p + "k_proj.weight": (kv, d), p + "v_proj.weight": (kv, d),
            p + "attn_out.weight": (d, d), p + "ff_proj.weight": (h, d), p + "up_proj.weight": (h, d),
            p + "ff_out.weight": (d, h),
        }
        if config.get("include_qkv_bias"):
            shapes |= {p + "q_proj.bias": (d,), p + "k_proj.bias": (kv,), p + "v_proj.bias": (kv,)}
    return _random(shapes, generator)


def dream_weights(config: dict, generator: torch.Generator) -> dict[str, torch.Tensor]:
    d, h, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * d // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (d, d), p + "self_attn.q_proj.bias": (d,),
            p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (d, d),
            p + "mlp.gate_proj.weight": (h, d), p + "mlp.up_proj.weight": (h, d), p + "mlp.down_proj.weight": (d, h),
        }
    return _random(shapes, generator)


def _random(shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[name] = 0.15 * torch.randn(shape, generator=generator)
    return out


def write_checkpoint(
    root: Path, config: dict, weights: dict[str, torch.Tensor], shards: int = 1, tokenizer: bool = True
) -> Path:
    """config.json, the weights (one file, or ``shards`` files with an index) and a tokenizer."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config, indent=1))
    if tokenizer:
        write_tokenizer(root)
    names = sorted(weights)
    if shards == 1:
        save_file({n: weights[n].contiguous() for n in names}, root / "model.safetensors")
        return root
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: weights[n].contiguous() for n in part}, root / file)
        weight_map |= {n: file for n in part}
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return root


def tiny_checkpoint(root: Path, family: str, seed: int = 0, shards: int = 1, **overrides) -> tuple[Path, dict, dict]:
    """Writes a tiny LLaDA or Dream checkpoint; returns (path, config, weights)."""
    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(root)
    generator = torch.Generator().manual_seed(seed)
    if family == "llada":
        config = llada_config(vocab, **overrides)
        weights = llada_weights(config, generator)
    else:
        config = dream_config(vocab, **overrides)
        weights = dream_weights(config, generator)
    write_checkpoint(root, config, weights, shards=shards, tokenizer=False)
    return root, config, weights


def tiny_ar_checkpoint(root: Path, max_positions: int = 128, seed: int = 0) -> Path:
    """Writes a tiny transformers Llama causal LM with the test tokenizer; returns its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(root)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"], bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the default init, so argmax ties are unlikely
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    model.save_pretrained(root)
    return root
