"""The trainer: masked-diffusion SFT of a LLaDA- or Dream-format model on a packed dataset, on
one device or under torchrun (DDP: NCCL on GPUs, gloo on CPUs).

- bf16 autocast on CUDA with fp32 master weights; AdamW, linear warm-up then cosine decay.
- Deterministic: batch b of step s is fixed by (seed, s) — an epoch-keyed permutation of the
  dataset and a step-keyed noise draw over the global batch, each rank taking its slice — so a
  resumed run sees exactly the batches an uninterrupted one would.
- Checkpoints: after each save ``out`` is a complete Hugging Face-style directory (config.json,
  model.safetensors in fp32 with the step in its header, tokenizer) that ``paradec.load`` reads,
  plus ``trainer_state.pt`` (optimizer, step) for ``resume``; ``loss_log.jsonl`` gets a line every
  ``log_every`` steps. DeepSpeed ZeRO is the option for 7-8B fine-tunes (README's training
  section); this trainer keeps to DDP.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file

from paradec.distributed.env import init_distributed, teardown
from paradec.errors import CheckpointError, ConfigError
from paradec.models.attention import MODES
from paradec.models.loading import build, load, load_tokenizer, resolve
from paradec.models.saving import save_checkpoint
from paradec.train.data import CanvasFormat
from paradec.train.objective import NoiseDraw, masked_diffusion_loss

STATE_FILE = "trainer_state.pt"
LOG_FILE = "loss_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """data: a packed dataset (``python -m paradec.train data``); tokenizer: its tokenizer
    directory; out: the checkpoint directory; model: the model's config.json (LLaDA or Dream
    format); batch_size: the global batch (split over ranks); steps, lr, warmup, min_lr (as a
    fraction of lr), weight_decay, grad_clip: the optimisation; attention: the training attention
    (``isolated`` so that decoding spread over ranks is exact); structure_aware: never mask
    headers; bf16: autocast on CUDA; max_minutes: stop early (checkpoint saved, resumable)."""

    data: str
    tokenizer: str
    out: str
    model: dict = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    attention: str = "isolated"
    structure_aware: bool = True
    bf16: bool = True
    compile: bool = False
    seed: int = 0
    save_every: int = 500
    log_every: int = 10
    max_minutes: float | None = None
    resume: bool = False
    init_from: str | None = None

    def __post_init__(self) -> None:
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"seed must be an int >= 0, got {self.seed!r}")
        for name in ("steps", "batch_size", "save_every", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not (isinstance(self.warmup, int) and 0 <= self.warmup <= self.steps):
            raise ConfigError(f"warmup must be an int in [0, steps={self.steps}], got {self.warmup!r}")
        if not (0 < self.lr < 1):
            raise ConfigError(f"lr must lie in (0, 1), got {self.lr}")
        if not (0 <= self.min_lr <= 1):
            raise ConfigError(f"min_lr (a fraction of lr) must lie in [0, 1], got {self.min_lr}")
        if not (self.weight_decay >= 0 and self.grad_clip > 0):
            raise ConfigError(f"weight_decay must be >= 0 and grad_clip > 0, got {self.weight_decay}, {self.grad_clip}")
        if self.attention not in MODES:
            raise ConfigError(f"attention must be one of {list(MODES)}, got {self.attention!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ConfigError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.init_from is None and not (isinstance(self.model, dict) and self.model):
            raise ConfigError("model must be a model config (a dict: config.json's contents), or give init_from")

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then cosine down to ``min_lr * lr``."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr + (1 - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


class PackedDataset:
    """A dataset file: ids, segments, roles [N, T] and its metadata (format, lengths, ids)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"data: {path} does not exist (build it with `python -m paradec.train data`)")
        with safe_open(path, framework="pt") as f:
            self.meta = json.loads((f.metadata() or {}).get("paradec", "{}"))
        tensors = load_file(path)
        missing = {"ids", "segments", "roles"} - set(tensors)
        if missing or not self.meta:
            raise ConfigError(f"data: {path} is not a paradec dataset (missing {sorted(missing) or 'metadata'})")
        self.ids, self.segments, self.roles = tensors["ids"].long(), tensors["segments"].long(), tensors["roles"].long()
        self._perm: tuple[int, torch.Tensor] | None = None  # (key, permutation) of the last epoch used

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch_indices(self, seed: int, step: int, batch: int) -> torch.Tensor:
        """[batch] dataset rows of global step ``step``: consecutive slices of per-epoch permutations."""
        n = len(self)
        first = step * batch
        out = []
        for epoch in range(first // n, (first + batch - 1) // n + 1):
            key = _mix(seed, epoch, 1)
            if self._perm is None or self._perm[0] != key:
                self._perm = (key, torch.randperm(n, generator=torch.Generator().manual_seed(key)))
            perm = self._perm[1]
            lo, hi = max(first, epoch * n) - epoch * n, min(first + batch, (epoch + 1) * n) - epoch * n
            out.append(perm[lo:hi])
        return torch.cat(out)


def _mix(*parts: int) -> int:
    value = 0
    for part in parts:
        value = (value * 0x9E3779B97F4A7C15 + part + 1) % (1 << 63)
    return value


def train(config: TrainConfig) -> Path:
    """Runs (or resumes) training; returns the checkpoint directory."""
    data = PackedDataset(config.data)
    env = init_distributed()
    try:
        return _train(config, data, env)
    finally:
        teardown()


def _train(config: TrainConfig, data: PackedDataset, env) -> Path:
    if config.batch_size % env.world_size:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {env.world_size} ranks")
    out = Path(config.out)
    tokenizer = load_tokenizer(Path(config.tokenizer))
    if config.init_from:
        model = load(config.init_from, device=env.device, dtype=torch.float32)
        model.tokenizer = tokenizer
        model_config = json.loads((resolve(config.init_from) / "config.json").read_text())
    else:
        model = build(config.model, device=env.device, dtype=torch.float32, seed=config.seed, tokenizer=tokenizer)
        model_config = config.model
    model_config = _with_generation_defaults(model_config, data.meta)
    _check_fit(model, tokenizer, data)
    module = model.module
    optimizer = torch.optim.AdamW(_param_groups(module, config.weight_decay), lr=config.lr, betas=(0.9, 0.95),
                                  fused=env.device.type == "cuda")
    start = _resume(config, module, optimizer, out) if config.resume else 0
    if env.is_rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(config) | {"dataset": data.meta}, indent=1) + "\n")
    module.train()
    step_fn = _TrainingView(module)
    if env.distributed:
        step_fn = torch.nn.parallel.DistributedDataParallel(step_fn, device_ids=[env.device] if env.device.type == "cuda" else None)
    if config.compile:
        step_fn = torch.compile(step_fn)
    local = config.batch_size // env.world_size
    mine = slice(env.rank * local, (env.rank + 1) * local)
    use_bf16 = config.bf16 and env.device.type == "cuda"
    progress = _progress(env.is_rank0, start, config.steps)
    t0, tokens, step = time.perf_counter(), 0, start
    log = (out / LOG_FILE).open("a" if config.resume else "w") if env.is_rank0 else None
    try:
        while step < config.steps:
            rows = data.batch_indices(config.seed, step, config.batch_size)[mine]
            noise = NoiseDraw.draw(torch.Generator().manual_seed(_mix(config.seed, step, 2)), config.batch_size,
                                   data.ids.shape[1]).rows(mine)
            lengths = (data.roles[rows] >= 0).sum(1)  # [local batch], on the host
            width = int(lengths.max())  # trim the batch's common padding
            ids, segs, roles = (x[rows, :width].to(env.device, non_blocking=True) for x in (data.ids, data.segments, data.roles))
            noise = NoiseDraw(noise.t, noise.u[:, :width])
            for group in optimizer.param_groups:
                group["lr"] = config.lr_at(step)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = masked_diffusion_loss(step_fn, ids, segs, roles, noise, data.meta["mask_id"],
                                             config.attention, config.structure_aware)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            tokens += int(lengths.sum()) * env.world_size
            if step % config.log_every == 0 or step == config.steps:
                value = _mean_over_ranks(loss.detach(), env)
                elapsed = time.perf_counter() - t0
                if log is not None:
                    log.write(json.dumps({"step": step, "loss": round(value, 5), "lr": config.lr_at(step - 1),
                                          "grad_norm": round(float(grad_norm), 4), "seconds": round(elapsed, 2),
                                          "tokens_per_s": round(tokens / elapsed)}) + "\n")
                    log.flush()
                progress.set_postfix(loss=f"{value:.4f}")
            progress.update(1)
            out_of_time = config.max_minutes is not None and time.perf_counter() - t0 > 60 * config.max_minutes
            stop = _any_rank(out_of_time, env)  # every rank every step: all stop at the same step
            if step % config.save_every == 0 or step == config.steps or stop:
                _save(config, model, model_config, optimizer, step, out, env)
            if stop:
                break
    finally:
        progress.close()
        if log is not None:
            log.close()
    module.eval()
    return out


class _TrainingView(torch.nn.Module):
    """The model's ``training_logits`` as a module's forward, for DDP and torch.compile to wrap."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module.training_logits(*args)


def _with_generation_defaults(model_config: dict, meta: dict) -> dict:
    """The model config with ``paradec.generation`` set to the layout the data was cut to, so
    ``paradec.generate(model, prompt)`` decodes the trained model the way it was trained."""
    if not {"kind", "block_len", "summary_len", "path_counts"} <= set(meta):
        return model_config
    fmt = CanvasFormat(meta["block_len"], meta["summary_len"], tuple(meta["path_counts"]))
    paths = max(fmt.path_counts)
    if meta["kind"] == "nap":
        generation = {"blocks": paths, "block_len": fmt.block_len, "summary_len": fmt.summary_len}
    else:
        generation = {"mode": "ao", "answer_len": fmt.longcot_len(paths)}
    extra = dict(model_config.get("paradec", {})) | {"generation": generation}
    return dict(model_config) | {"paradec": extra}


def _check_fit(model, tokenizer, data: PackedDataset) -> None:
    """The data, the tokenizer and the model must agree on ids and lengths (DESIGN.md contract 6):
    a model trained to unmask one id and decoded with another would never work."""
    spec, meta = model.spec, data.meta
    for name, in_data, in_model, in_tokenizer in (
        ("mask id", meta.get("mask_id"), spec.mask_id, tokenizer.mask_token_id),
        ("EOS id", meta.get("eos_id"), spec.eos_id, tokenizer.eos_token_id),
    ):
        if not in_data == in_model == in_tokenizer:
            raise ConfigError(f"the {name} differs: data {in_data}, model config {in_model}, tokenizer {in_tokenizer}")
    top = int(data.ids.max())
    if top >= spec.vocab_size:
        raise ConfigError(f"data holds token id {top}, beyond the model's vocabulary of {spec.vocab_size}")
    if data.ids.shape[1] > spec.max_length:
        raise ConfigError(f"data rows hold {data.ids.shape[1]} tokens, beyond the model's maximum length {spec.max_length}")


def _param_groups(module, weight_decay: float) -> list[dict]:
    """No weight decay on norms and embeddings (as LLaDA and most LM recipes do)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        (no_decay if p.ndim < 2 or "embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _progress(enabled: bool, start: int, total: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def _mean_over_ranks(value: torch.Tensor, env) -> float:
    if env.distributed:
        value = value.clone()
        dist.all_reduce(value)
        value /= env.world_size
    return float(value)


def _any_rank(flag: bool, env) -> bool:
    if not env.distributed:
        return flag
    t = torch.tensor([int(flag)], device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _save(config: TrainConfig, model, model_config: dict, optimizer, step: int, out: Path, env) -> None:
    if env.is_rank0:
        # The optimizer state (the slow write) goes to a temporary file first; the weights are
        # then renamed into place and the state right after, so an interruption leaves at most a
        # mismatched pair, which resume names, never a half-written file.
        state = {"step": step, "optimizer": optimizer.state_dict(), "seed": config.seed}
        torch.save(state, out / (STATE_FILE + ".tmp"))
        save_checkpoint(model.module, model_config, out, model.tokenizer, dtype=torch.float32,
                        metadata={"step": str(step)})
        os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)
    if env.distributed:
        dist.barrier()


def _resume(config: TrainConfig, module, optimizer, out: Path) -> int:
    """Loads weights and optimizer state from ``out``; returns the step to continue from."""
    state_path, weights = out / STATE_FILE, out / "model.safetensors"
    if not state_path.exists() or not weights.exists():
        raise CheckpointError(f"resume: {out} holds no checkpoint ({STATE_FILE} and model.safetensors)")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointError(f"resume: {state_path} cannot be read ({err}); corrupt or partial?") from err
    loaded = load(out, device=next(module.parameters()).device, dtype=torch.float32)
    with safe_open(weights, framework="pt") as f:
        saved_step = (f.metadata() or {}).get("step")
    if saved_step is None:
        raise CheckpointError(f"resume: {weights} carries no training step in its header (not written by the trainer)")
    saved_step = int(saved_step)
    if saved_step != state["step"]:
        raise CheckpointError(
            f"resume: {weights} is from step {saved_step} but {STATE_FILE} from step {state['step']}; "
            "the last save was interrupted"
        )
    if state.get("seed") != config.seed:
        raise CheckpointError(f"resume: the run was trained with seed {state.get('seed')}, not {config.seed}")
    try:
        module.load_state_dict(loaded.module.state_dict())
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError) as err:
        raise CheckpointError(f"resume: {out} does not fit this model or optimizer ({err})") from err
    for group, wanted in zip(optimizer.param_groups, _param_groups(module, config.weight_decay)):
        group["weight_decay"] = wanted["weight_decay"]  # this run's setting, not the saved one
    return int(state["step"])
