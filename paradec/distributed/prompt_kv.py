"""Getting the prompt KV to every rank: broadcast from the summary owner, or recompute locally.

Cost model (``choose``): broadcasting moves ``prompt tokens × KV bytes per token`` over the
link; recomputing costs a prefill of ``2 × parameters × prompt tokens`` FLOPs. Both rates are
measured once per process on first use: the link by timing broadcasts of a 16 MiB tensor, the
compute by timing a forward of the model itself over a 128-token prompt (so the figure includes
attention and launch overheads). The cheaper one wins. An 8B MHA model's KV is 0.5 MiB per
token: a 2k-token prompt is ~1 GiB, ~7 ms over NVLink-class links but ~80 ms of prefill FLOPs
at 400 TFLOP/s, so GPUs broadcast; CPU ranks with gloo over loopback and small models usually
recompute.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paradec.distributed.env import DistEnv
from paradec.distributed.placement import SUMMARY_RANK
from paradec.models.attention import PAD, PROMPT
from paradec.models.loading import DiffusionModel
from paradec.models.transformer import PromptCache, count_parameters

CHOICES = ("auto", "broadcast", "recompute")
_MEASURED: dict[str, float] = {}


@dataclass(frozen=True)
class Costs:
    broadcast_s: float
    recompute_s: float

    @property
    def choice(self) -> str:
        return "broadcast" if self.broadcast_s < self.recompute_s else "recompute"


def kv_bytes_per_token(model: DiffusionModel) -> int:
    cfg = model.module.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize


def estimate(model: DiffusionModel, env: DistEnv, prompt_tokens: int) -> Costs:
    """Predicted seconds for both ways; every rank computes the same numbers (rank 0's
    measurements are shared), so every rank makes the same choice."""
    link_bps, flops = _measure(model, env)
    flops_needed = 2 * count_parameters(model.module) * prompt_tokens
    return Costs(prompt_tokens * kv_bytes_per_token(model) / link_bps, flops_needed / flops)


def _measure(model: DiffusionModel, env: DistEnv) -> tuple[float, float]:
    key = f"{env.device}:{model.dtype}"
    if key not in _MEASURED:
        payload = torch.empty(16 << 20, dtype=torch.uint8, device=env.device)
        times = []
        for _ in range(4):
            _sync(env)
            t0 = time.perf_counter()
            dist.broadcast(payload, src=SUMMARY_RANK)
            _sync(env)
            times.append(time.perf_counter() - t0)
        link = payload.numel() / statistics.median(times[1:])
        prompt = torch.zeros(1, 128, dtype=torch.long, device=env.device)
        lengths = torch.tensor([128], device=env.device)
        model.prefill(prompt, lengths, check_inputs=False)  # warm-up
        _sync(env)
        t0 = time.perf_counter()
        model.prefill(prompt, lengths, check_inputs=False)
        _sync(env)
        flops = 2 * count_parameters(model.module) * 128 / (time.perf_counter() - t0)
        rates = torch.tensor([link, flops], dtype=torch.float64, device=env.device)
        dist.broadcast(rates, src=SUMMARY_RANK)  # one answer for every rank
        _MEASURED[key] = float(rates[0]), float(rates[1])
    return _MEASURED[key]


def share(model: DiffusionModel, env: DistEnv, prompt_ids: torch.Tensor, lengths: torch.Tensor,
          how: str, reserve: int) -> PromptCache:
    """The prompt cache on every rank. ``how``: broadcast or recompute (already chosen)."""
    if how == "recompute":
        return model.prefill(prompt_ids, lengths, reserve=reserve)
    cfg = model.module.cfg
    b, p = prompt_ids.shape
    if env.rank == SUMMARY_RANK:
        cache = model.prefill(prompt_ids, lengths, reserve=reserve)
        prefix = cache.kv[..., :p, :].contiguous()
        last = cache.last_hidden.contiguous()
    else:
        prefix = torch.empty(cfg.num_layers, 2, b, cfg.num_kv_heads, p, cfg.head_dim, dtype=model.dtype,
                             device=env.device)
        last = torch.empty(b, cfg.hidden_size, dtype=model.dtype, device=env.device)
    dist.broadcast(prefix, src=SUMMARY_RANK)
    dist.broadcast(last, src=SUMMARY_RANK)
    if env.rank == SUMMARY_RANK:
        return cache
    kv = prefix.new_empty(*prefix.shape[:4], p + reserve, cfg.head_dim)
    kv[..., :p, :] = prefix
    positions = torch.arange(p, device=env.device).expand(b, p)
    segments = torch.where(positions < lengths[:, None], PROMPT, PAD)
    return PromptCache(kv=kv, segments=segments, lengths=lengths, last_hidden=last)


def _sync(env: DistEnv) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
