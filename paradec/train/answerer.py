"""A tiny autoregressive answerer for NAR→AR on the synthetic task (``paradec.hybrid``), and a
tiny scorer for SeqDep on the same task.

The answerer learns two stages from the same problems as the built-in diffusion model:
- answer: ``answer_prompt(question, paths)`` → `` #### N`` — read up to 8 independent paths
  (a minority of them with a slip) and state the majority's, i.e. the right, answer;
- trace (for the AR→AR baseline): ``{question}\\n\\nReasoning 1:`` → one clean path.
A transformers ``LlamaForCausalLM`` (default 4 layers, width 256), a word-level tokenizer over
the task's words and the template's, next-token cross-entropy on the completion only, AdamW
with warm-up and cosine decay, bf16 autocast on a GPU. Saved as a transformers checkpoint that
``paradec.models.ar.ARModel.load`` reads.

The scorer (``objective="scorer"``) is the same model trained as a language model of the task's
reasoning texts, in both serialisations, with loss on everything after the question:
- NAP format: ``{question}\n\n`` → ``Reasoning: R1\n … Reasoning: Rm\n\nAnswer: #### N`` — the
  paths carry no index, so one path after the question reads as any path would;
- long CoT: ``{question}\n\nReasoning:`` → `` R1 R2 … Rm`` — the paths as one chain.
m is drawn from 1..4, the paths are clean. ``benchmarks/seqdep_synthetic.py`` scores both
serialisations with it.

    python -m paradec.train answerer --out paradec/models/builtin/paradec-tiny-answerer
    python -m paradec.train answerer --objective scorer --out runs/paradec-tiny-scorer
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from paradec.errors import ConfigError
from paradec.hybrid import answer_prompt
from paradec.train.tasks import arith
from paradec.train.tokenizer import build_word_tokenizer

TEMPLATE_WORDS = ["Reasoning", "Summary", "Answer", ":"]
PATH_COUNTS = (1, 2, 3, 4, 5, 6, 7, 8)
SCORER_PATH_COUNTS = (1, 2, 3, 4)
OBJECTIVES = ("answerer", "scorer")


@dataclass
class AnswererConfig:
    out: str
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    layers: int = 4
    width: int = 256
    heads: int = 8
    max_length: int = 768
    noise: float = 0.15
    seed: int = 0
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    max_minutes: float | None = None
    objective: str = "answerer"


def stage_pairs(problem: arith.Problem, rng: random.Random, noise: float) -> list[tuple[str, str]]:
    """(prompt, completion) for both stages of one problem."""
    count = rng.choice(PATH_COUNTS)
    noisy = min(sum(rng.random() < noise for _ in range(count)), (count - 1) // 2)
    paths = arith.solution_paths(problem, count, rng, noisy)
    clean = [p for p in paths if p.final == problem.answer]
    pairs = [(answer_prompt(problem.question, [p.text for p in paths]), f" #### {problem.answer}")]
    if clean:
        pairs.append((f"{problem.question}\n\nReasoning 1:", " " + clean[0].text))
    return pairs


def nap_text(question: str, paths: list[str], answer: int) -> tuple[str, list[str]]:
    """The NAP serialisation the scorer reads: (prompt, segments = the paths, then the answer)."""
    return f"{question.strip()}\n\n", [f"Reasoning: {p}\n" for p in paths] + [f"\nAnswer: #### {answer}"]


def longcot_text(question: str, paths: list[str]) -> tuple[str, str]:
    """The long-CoT serialisation: (prompt, the paths as one chain)."""
    return f"{question.strip()}\n\nReasoning:", "".join(" " + p for p in paths)


def scorer_pairs(problem: arith.Problem, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, completion) of both serialisations of one problem with m clean paths."""
    paths = [p.text for p in arith.solution_paths(problem, rng.choice(SCORER_PATH_COUNTS), rng)]
    prompt, segments = nap_text(problem.question, paths, problem.answer)
    return [(prompt, "".join(segments)), longcot_text(problem.question, paths)]


def build(cfg: AnswererConfig):
    """The tokenizer and a randomly initialised model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_word_tokenizer(arith.vocabulary() + TEMPLATE_WORDS)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=3 * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_length, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(cfg.seed)
    return tokenizer, LlamaForCausalLM(config)


def batch_of(tokenizer, pairs: list[tuple[str, str]], max_length: int, device) -> tuple[torch.Tensor, ...]:
    """input_ids, attention_mask, labels: [B, T] (labels -100 outside the completions)."""
    rows = []
    for prompt, completion in pairs:
        head = tokenizer.encode(prompt, add_special_tokens=True)
        tail = tokenizer.encode(completion, add_special_tokens=False) + [tokenizer.eos_token_id]
        ids = (head + tail)[:max_length]
        rows.append((ids, len(head)))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for r, (ids, head) in enumerate(rows):
        input_ids[r, : len(ids)] = torch.tensor(ids)
        labels[r, head : len(ids)] = input_ids[r, head : len(ids)]
        mask[r, : len(ids)] = 1
    return input_ids.to(device), mask.to(device), labels.to(device)


def train(cfg: AnswererConfig) -> dict:
    """Trains and saves the answerer to ``cfg.out``; returns the last logged record."""
    if cfg.objective not in OBJECTIVES:
        raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {cfg.objective!r}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer, model = build(cfg)
    device = torch.device(cfg.device)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    schedule = lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * s / cfg.steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    rng = random.Random(cfg.seed)
    problems = arith.training_problems(cfg.seed + 17)
    start, record, log = time.monotonic(), {}, []
    for step in range(cfg.steps):
        pairs = []
        while len(pairs) < cfg.batch_size:
            problem = next(problems)
            pairs += stage_pairs(problem, rng, cfg.noise) if cfg.objective == "answerer" else scorer_pairs(problem, rng)
        input_ids, mask, labels = batch_of(tokenizer, pairs[: cfg.batch_size], cfg.max_length, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == cfg.steps - 1:
            record = {"step": step, "loss": float(loss), "lr": scheduler.get_last_lr()[0],
                      "seconds": round(time.monotonic() - start, 1)}
            log.append(record)
            print(json.dumps(record), flush=True)
        if cfg.max_minutes is not None and time.monotonic() - start > 60 * cfg.max_minutes:
            break
    model.eval().to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=1))
    (out / "loss_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return record
