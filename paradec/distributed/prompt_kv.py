"""Getting the prompt KV to every rank: broadcast from the summary owner, or recompute locally.

Either way the ranks start thinking when the slowest one holds the cache. Broadcasting: the
owner prefills, then sends ``prompt tokens × KV bytes per token`` while the others wait.
Recomputing: every rank prefills at once. On identical idle GPUs recomputing is never slower,
since the owner's prefill happens either way; broadcasting wins when another rank prefills
slower than the owner by more than the transfer takes (a slower or busier GPU), and it spares
the other ranks the prefill's compute. An 8B MHA model's KV is 0.5 MiB per token: a 2k-token
prompt is ~1 GiB, a few ms over NVLink-class links against tens of ms of prefill.

Cost model (``estimate``): ``measure``d on every rank at once — the link, by timing broadcasts
of a 16 MiB tensor from the owner; each rank's prefill, as a fixed cost plus a cost per token,
from timed prefills of this model over 128 and 512 tokens — once per model and device: the
model's engine keeps the rates (``paradec.engine.Engine.prompt_kv_rates``).
Predicted: broadcast = the owner's prefill + bytes / link rate; recompute = the slowest rank's
prefill. The cheaper one wins.
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
from paradec.models.cache import PromptCache

CHOICES = ("auto", "broadcast", "recompute")
_PROBE_TOKENS = (128, 512)


@dataclass(frozen=True)
class Costs:
    broadcast_s: float
    recompute_s: float

    @property
    def choice(self) -> str:
        return "broadcast" if self.broadcast_s < self.recompute_s else "recompute"


@dataclass(frozen=True)
class Rates:
    """What ``measure`` found: the owner's view of the link, and each rank's prefill cost."""

    link_bytes_per_s: float
    prefill: list[tuple[float, float]]  # per rank: (fixed seconds, seconds per token)

    def prefill_s(self, rank: int, tokens: int) -> float:
        fixed, per_token = self.prefill[rank]
        return fixed + per_token * tokens


def kv_bytes_per_token(model: DiffusionModel) -> int:
    cfg = model.module.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize


def estimate(rates: Rates, model: DiffusionModel, env: DistEnv, prompt_tokens: int) -> Costs:
    """Predicted seconds until every rank holds the prompt KV, both ways; every rank computes
    the same numbers from the same gathered measurements, so every rank makes the same choice."""
    transfer = prompt_tokens * kv_bytes_per_token(model) / rates.link_bytes_per_s
    slowest = max(rates.prefill_s(r, prompt_tokens) for r in range(env.world_size))
    return Costs(rates.prefill_s(SUMMARY_RANK, prompt_tokens) + transfer, slowest)


def measure(model: DiffusionModel, env: DistEnv) -> Rates:
    """The link and every rank's prefill rates, timed now: a collective, every rank at once."""
    payload = torch.empty(16 << 20, dtype=torch.uint8, device=env.device)
    times = []
    for _ in range(4):
        _sync(env)
        t0 = time.perf_counter()
        dist.broadcast(payload, src=SUMMARY_RANK)
        _sync(env)
        times.append(time.perf_counter() - t0)
    link = torch.tensor([payload.numel() / statistics.median(times[1:])], dtype=torch.float64, device=env.device)
    dist.broadcast(link, src=SUMMARY_RANK)  # the owner's view of the link, for every rank
    short, long = (_prefill_seconds(model, env, n) for n in _PROBE_TOKENS)
    per_token = max(long - short, 0.0) / (_PROBE_TOKENS[1] - _PROBE_TOKENS[0])
    mine = torch.tensor([short - per_token * _PROBE_TOKENS[0], per_token], dtype=torch.float64, device=env.device)
    every = [torch.empty_like(mine) for _ in range(env.world_size)]
    dist.all_gather(every, mine)
    return Rates(float(link), [(float(t[0]), float(t[1])) for t in every])


def _prefill_seconds(model: DiffusionModel, env: DistEnv, tokens: int) -> float:
    """Median of three timed prefills of ``tokens`` tokens, after a warm-up."""
    prompt = torch.zeros(1, tokens, dtype=torch.long, device=env.device)
    lengths = torch.tensor([tokens], device=env.device)
    times = []
    for i in range(4):
        _sync(env)
        t0 = time.perf_counter()
        model.prefill(prompt, lengths, check_inputs=False)
        _sync(env)
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prefill(model: DiffusionModel, env: DistEnv, prompt_ids: torch.Tensor, lengths: torch.Tensor, how: str,
            reserve: int) -> PromptCache | None:
    """This rank's own prefill: every rank's when recomputing, the owner's alone when
    broadcasting (None elsewhere: ``broadcast`` fills it in)."""
    if how == "recompute" or env.rank == SUMMARY_RANK:
        return model.prefill(prompt_ids, lengths, reserve=reserve)
    return None


def broadcast(model: DiffusionModel, env: DistEnv, cache: PromptCache | None, prompt_ids: torch.Tensor,
              lengths: torch.Tensor, reserve: int) -> PromptCache:
    """The owner's prompt cache (``cache`` there) on every rank, ``reserve`` free columns after it."""
    cfg = model.module.cfg
    b, p = prompt_ids.shape
    if env.rank == SUMMARY_RANK:
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
