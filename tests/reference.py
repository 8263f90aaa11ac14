"""A float64 reference forward written from the published model descriptions, one sequence at a
time and with explicit per-head attention, reading the checkpoint's own parameter names."""

from __future__ import annotations

import torch


def _rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    # x: [T, D]; rotate_half convention: pairs (i, i + D/2).
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = positions.double()[:, None] * inv[None]
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[:, : d // 2], x[:, d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(family: str, config: dict, weights: dict, ids, positions, allowed) -> torch.Tensor:
    """ids, positions: [T]; allowed: [T, T] bool (query, key). Returns [T, V] float64 logits as
    the published model emits them, before any shift."""
    w = {k: v.double() for k, v in weights.items()}
    if family == "llada":
        d, heads, kvh = config["d_model"], config["n_heads"], config["n_kv_heads"]
        layers, theta, eps = config["n_layers"], config["rope_theta"], config["rms_norm_eps"]
        emb, final_norm, head = "model.transformer.wte.weight", "model.transformer.ln_f.weight", "model.transformer.ff_out.weight"

        def names(i):
            p = f"model.transformer.blocks.{i}."
            return dict(n1=p + "attn_norm", n2=p + "ff_norm", q=p + "q_proj", k=p + "k_proj", v=p + "v_proj",
                        o=p + "attn_out", gate=p + "ff_proj", up=p + "up_proj", down=p + "ff_out")
    else:
        d, heads, kvh = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
        layers, theta, eps = config["num_hidden_layers"], config["rope_theta"], config["rms_norm_eps"]
        emb, final_norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

        def names(i):
            p = f"model.layers.{i}."
            return dict(n1=p + "input_layernorm", n2=p + "post_attention_layernorm", q=p + "self_attn.q_proj",
                        k=p + "self_attn.k_proj", v=p + "self_attn.v_proj", o=p + "self_attn.o_proj",
                        gate=p + "mlp.gate_proj", up=p + "mlp.up_proj", down=p + "mlp.down_proj")

    def lin(x, name):
        y = x @ w[name + ".weight"].T
        return y + w[name + ".bias"] if name + ".bias" in w else y

    hd = d // heads
    x = w[emb][ids]
    for i in range(layers):
        n = names(i)
        h = _rms(x, w[n["n1"] + ".weight"], eps)
        q, k, v = lin(h, n["q"]), lin(h, n["k"]), lin(h, n["v"])
        outs = []
        for hq in range(heads):
            hk = hq // (heads // kvh)  # kv head shared by a group of consecutive query heads
            qh = _rope(q[:, hq * hd:(hq + 1) * hd], positions, theta)
            kh = _rope(k[:, hk * hd:(hk + 1) * hd], positions, theta)
            vh = v[:, hk * hd:(hk + 1) * hd]
            scores = (qh @ kh.T) / hd**0.5
            scores = scores.masked_fill(~allowed, float("-inf"))
            outs.append(torch.softmax(scores, -1) @ vh)
        x = x + lin(torch.cat(outs, -1), n["o"])
        h = _rms(x, w[n["n2"] + ".weight"], eps)
        x = x + lin(torch.nn.functional.silu(lin(h, n["gate"])) * lin(h, n["up"]), n["down"])
    x = _rms(x, w[final_norm], eps)
    return x @ w[head if head in w else emb].T


def isolated_allowed(segments: torch.Tensor) -> torch.Tensor:
    """segments: [T] with 0 = prompt, j >= 1 = think block, -2 = summary -> [T, T] bool."""
    q, k = segments[:, None], segments[None, :]
    return (k == 0) | (k == q) | (q == -2)
