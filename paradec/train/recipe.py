"""The built-in model's recipe: the synthetic task's data in both formats, and the model shape.

``build_task_data`` writes, from one stream of problems and the *same* sampled paths, a
tokenizer, ``nap.safetensors`` (canvas instances) and ``longcot.safetensors`` (the paths
serialised), and ``curation.json`` (what was kept and rejected, with why).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
from pathlib import Path


from paradec.errors import ConfigError
from paradec.models.saving import save_tensors
from paradec.train import data as curation
from paradec.train.tasks import arith
from paradec.train.tokenizer import build_word_tokenizer

# The built-in canvas: 40-token think bodies (a path of the task takes at most 38) and an
# 8-token summary ("votes a b c d #### N" for 4 paths).
BLOCK_LEN, SUMMARY_LEN = 40, 8
PATH_COUNTS, PATH_WEIGHTS = (2, 3, 4), (1, 1, 3)


def tiny_model_config(tokenizer, layers: int = 6, width: int = 256, heads: int = 8, mlp: int = 768) -> dict:
    """A LLaDA-format config.json for paradec-tiny (about 5M parameters at the defaults)."""
    vocab = -(-len(tokenizer) // 64) * 64  # rows padded to a multiple of 64, as LLaDA pads its embedding
    return {
        "model_type": "llada",
        "architectures": ["LLaDAModelLM"],
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "d_model": width,
        "n_heads": heads,
        "n_kv_heads": heads,
        "n_layers": layers,
        "mlp_hidden_size": mlp,
        "vocab_size": len(tokenizer),
        "embedding_size": vocab,
        "max_sequence_length": 512,
        "rope": True,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "include_bias": False,
        "include_qkv_bias": False,
        "weight_tying": False,
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def reasoning_example(problem: arith.Problem, paths: int, rng: random.Random, noise: float) -> curation.ReasoningExample:
    """``paths`` solution paths, each noisy with probability ``noise`` but always a minority."""
    noisy = min(sum(rng.random() < noise for _ in range(paths)), (paths - 1) // 2)
    sampled = arith.solution_paths(problem, paths, rng, noisy)
    return curation.ReasoningExample(problem.question, tuple(p.text for p in sampled), str(problem.answer),
                                     arith.summary_text(sampled, problem.answer))


CHUNK = 5000


def _examples(seed: int, chunk: int, size: int, noise: float) -> list[curation.ReasoningExample]:
    """Chunk ``chunk`` of the example stream: its own random streams, so chunks build in parallel."""
    rng = random.Random(seed * 1_000_003 + chunk)
    stream = arith.training_problems(seed * 1_000_003 + chunk)
    return [reasoning_example(next(stream), rng.choices(PATH_COUNTS, PATH_WEIGHTS)[0], rng, noise) for _ in range(size)]


def _build_chunk(job):
    """Both formats of one chunk's examples (in a worker process)."""
    tokenizer_dir, seed, chunk, size, noise = job
    from paradec.models.loading import load_tokenizer

    tok = load_tokenizer(Path(tokenizer_dir))
    examples = _examples(seed, chunk, size, noise)
    fmt = curation.CanvasFormat(BLOCK_LEN, SUMMARY_LEN, PATH_COUNTS)
    built = {kind: curation.curate(tok, examples, fmt, kind, tok.eos_token_id, tok.mask_token_id)
             for kind in curation.FORMATS}
    return _same_examples(built, len(examples))


def _same_examples(built: dict, count: int) -> dict:
    """Keeps an example in every format or in none, so the formats hold the same traces; an
    example one format rejects is reported, with that format's reason, under every format."""
    rejected: dict[int, str] = {}
    for _, report in built.values():
        for i, why in report.rejected:
            rejected.setdefault(i, why)
    out = {}
    for kind, (instances, report) in built.items():
        own = {i for i, _ in report.rejected}
        by_index = dict(zip((i for i in range(count) if i not in own), instances))
        kept = [by_index[i] for i in range(count) if i not in rejected]
        out[kind] = (kept, curation.CurationReport(kept=len(kept), rejected=sorted(rejected.items())))
    return out


def build_task_data(out: str | Path, problems: int, seed: int = 0, noise: float = 0.15,
                    workers: int | None = None) -> dict:
    """Writes the tokenizer and both datasets under ``out``, built in chunks of CHUNK problems
    over ``workers`` processes (default: the CPU count, at most 16); returns the curation
    summary. The same examples (problems and sampled paths) feed both formats."""
    out = Path(out)
    if problems < 1:
        raise ConfigError(f"problems must be >= 1, got {problems}")
    workers = workers or max(1, min(16, os.cpu_count() or 1))
    tokenizer = build_word_tokenizer(arith.vocabulary(), out / "tokenizer")
    jobs = [(str(out / "tokenizer"), seed, c, min(CHUNK, problems - c * CHUNK), noise)
            for c in range(-(-problems // CHUNK))]
    if workers == 1:
        parts = [_build_chunk(job) for job in jobs]
    else:
        with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(_build_chunk, jobs)
    summary = {}
    for kind in curation.FORMATS:
        instances, report = [], curation.CurationReport()
        for c, part in enumerate(parts):
            chunk_instances, chunk_report = part[kind]
            instances += chunk_instances
            report.kept += chunk_report.kept
            report.rejected += [(c * CHUNK + i, why) for i, why in chunk_report.rejected]
        meta = {"kind": kind, "task": "arith", "block_len": BLOCK_LEN, "summary_len": SUMMARY_LEN,
                "path_counts": list(PATH_COUNTS), "noise": noise, "seed": seed, "mask_id": tokenizer.mask_token_id,
                "eos_id": tokenizer.eos_token_id, "curation": report.summary()}
        save_tensors(curation.pack(instances, tokenizer.pad_token_id), out / f"{kind}.safetensors",
                     metadata={"paradec": json.dumps(meta)})
        summary[kind] = {"kept": report.kept, "rejected": report.rejected, "counts": dict(report.counts)}
    (out / "curation.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
