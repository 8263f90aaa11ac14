"""Latency of every decoding mode on one GPU at LLaDA-8B / Dream-7B shapes, against AR.

Random bf16 weights built on the GPU, so confidence means nothing: every mode commits a fixed
number of tokens per step (``--tokens-per-step``; the threshold rules would not), EOS does not
close regions, and what is measured is time, never text. Prompts are GSM8K test problems (with
their worked answers) packed to ``--prompt-lens`` tokens by a BPE trained on GSM8K's train
split (the published tokenizers cannot be downloaded here; token identity does not change the
time).

Modes: ``ar`` (paradec's static-cache causal decoder, one CUDA graph per token; and, with
``--hf-reference``, transformers' ``generate`` with a static cache at the same shape), ``block``
with the ``prefix`` and ``dual`` caches (block length ``--block-len``), ``ao`` (one region, the
whole of it forwarded each step, prompt KV cached), ``nap`` exact (whole blocks forwarded) and
``nap`` windowed (``--window`` tokens of each block at a time, dual cache). Steps replay as CUDA
graphs (greedy, static shapes). For each: wall time of a whole generation (median over
``--repeats`` after a first run that captures the graphs), per-phase seconds, peak memory, and
for graphed modes the time of one step against the bare forward of the same tokens in a graph.

    python benchmarks/latency.py --data ../shared/data/gsm8k --out-dir /tmp/latency
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
from pathlib import Path

import torch

from harness import banner, capture_graph, emit_json, median_ms, synced
from paradec import GenerationConfig
from paradec.api import build_layout
from paradec.decoding.causal import StaticCausalDecoder
from paradec.decoding.runner import Runner
from paradec.models import build, count_parameters, reference_config

NOTE = ("random weights: every mode commits a fixed number of tokens per step (confidence is "
        "meaningless here); EOS does not close regions")


# --- inputs ---------------------------------------------------------------------------------
def gsm8k_tokenizer(data: Path):
    """A 32k BPE trained on GSM8K's train split (questions and answers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        with open(data / "train.jsonl") as f:
            for line in f:
                row = json.loads(line)
                yield row["question"] + "\n" + row["answer"]

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.train_from_iterator(texts(), trainers.BpeTrainer(vocab_size=32000, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def packed_prompt(tokenizer, data: Path, length: int) -> list[int]:
    """GSM8K test problems with their answers, back to back, cut at ``length`` tokens."""
    ids: list[int] = []
    with open(data / "test.jsonl") as f:
        for line in f:
            row = json.loads(line)
            ids += tokenizer.encode(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n")
            if len(ids) >= length:
                return ids[:length]
    raise SystemExit(f"{data / 'test.jsonl'} holds fewer than {length} tokens")


# --- timing ---------------------------------------------------------------------------------
def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> float:
    """Resets the peak counter; returns what is allocated now (GiB: the weights and whatever
    earlier runs left behind), so a run's own share is its peak minus this."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated() / 2**30


def decode(model, prompt: list[int], repeats: int, step_times: bool, summary: bool = True, **settings) -> dict:
    """A whole generation, timed: the first run (captures graphs) and the median of repeats.
    summary=False decodes the think blocks only (what an NAR→AR answerer reads)."""
    config = GenerationConfig(eos_closes_block=False, chat_template=False, **settings)
    layout = build_layout(model, config)
    resident = reset_peak()
    runner = Runner(model, config, layout, [prompt], summary=None if summary else False)
    t0 = synced()
    output = runner.run()
    first = synced() - t0
    walls = []
    for _ in range(repeats):
        runner.reset([prompt])
        t0 = synced()
        output = runner.run()
        walls.append(synced() - t0)
    row = {
        "canvas": layout.length,
        "steps": output.steps,
        "nfe": output.nfe,
        "first_s": first,
        "wall_s": statistics.median(walls),
        "phases_s": {k: round(v, 4) for k, v in output.timings.items()},
        "peak_gib": peak_gib(),
        "resident_gib": resident,
        "graphs": runner.capture,
    }
    if step_times and runner.capture:
        steps = runner.steps[tuple(runner.phases[0])]
        row["step_ms"] = median_ms(steps.step_graph.replay, warmup=3, repeats=20)
        forward_graph, logits = capture_graph(steps.forward)
        row["forward_ms"] = median_ms(forward_graph.replay, warmup=3, repeats=20)
        forward_graph.reset()
        del logits
        row["step_tokens"] = int(steps.step_cols.unique().numel())  # repeats pad a window
        if steps.refresh_graph is not None:
            row["refresh_ms"] = median_ms(steps.refresh_graph.replay, warmup=3, repeats=10)
        del forward_graph, steps
    runner.release()
    del runner
    gc.collect()
    torch.cuda.empty_cache()
    return row


def ar(model, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    decoder = StaticCausalDecoder(model.module, 1, len(prompt) + new_tokens)
    ids = torch.tensor([prompt], device=model.device)
    resident = reset_peak()
    decoder.generate(ids, new_tokens)  # captures the graph
    runs = [decoder.generate(ids, new_tokens) for _ in range(repeats)]
    decoder.graph = None
    del decoder
    gc.collect()
    wall = statistics.median(r.timings["total"] for r in runs)
    decode_s = statistics.median(r.timings["decode"] for r in runs)
    return {"canvas": new_tokens, "steps": new_tokens, "wall_s": wall,
            "phases_s": {"prefill": statistics.median(r.timings["prefill"] for r in runs), "decode": decode_s},
            "token_ms": decode_s / (new_tokens - 1) * 1e3, "peak_gib": peak_gib(), "resident_gib": resident}


def hf_reference(name: str, prompt: list[int], new_tokens: int) -> dict:
    """transformers' LlamaForCausalLM at the same shape, ``generate`` with a static cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = reference_config(name)
    shape = dict(
        hidden_size=ref.get("d_model", ref.get("hidden_size")),
        intermediate_size=ref.get("mlp_hidden_size", ref.get("intermediate_size")),
        num_hidden_layers=ref.get("n_layers", ref.get("num_hidden_layers")),
        num_attention_heads=ref.get("n_heads", ref.get("num_attention_heads")),
        num_key_value_heads=ref.get("n_kv_heads", ref.get("num_key_value_heads")),
        vocab_size=ref.get("embedding_size", ref.get("vocab_size")),
    )
    config = LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlamaForCausalLM(config).eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.tensor([prompt], device="cuda")
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", pad_token_id=0)
    model.generate(ids, **kwargs)
    times = []
    for _ in range(2):
        t0 = synced()
        model.generate(ids, **kwargs)
        times.append(synced() - t0)
    del model
    return {"canvas": new_tokens, "steps": new_tokens, "wall_s": statistics.median(times),
            "token_ms": statistics.median(times) / new_tokens * 1e3}


def kv_copy_ms(model, prompt: list[int]) -> float:
    """Device-to-device copy of the prompt's KV: the stand-in for sending it over NVLink."""
    ids = torch.tensor([prompt], device="cuda")
    cache = model.prefill(ids, torch.tensor([len(prompt)], device="cuda"))
    out = torch.empty_like(cache.kv)
    return median_ms(lambda: out.copy_(cache.kv), warmup=3, repeats=20)


# --- the sweep ------------------------------------------------------------------------------
def nap_shape(canvas: int, blocks: int, summary: int = 128) -> dict:
    """think blocks and a summary whose bodies fill ``canvas`` tokens (headers not counted)."""
    return dict(mode="nap", blocks=blocks, block_len=(canvas - summary) // blocks, summary_len=summary)


def sweep(model, name: str, prompts: dict[int, list[int]], args, log) -> list[dict]:
    rows = []

    def record(mode: str, prompt_len: int, settings: dict, row: dict) -> None:
        row = {"model": name, "prompt_len": prompt_len, **settings, **row, "mode": mode}
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"  {mode:14} P={prompt_len:<5} canvas={row['canvas']:<5} steps={row['steps']:<5} "
              f"wall={row['wall_s'] * 1e3:9.1f} ms  step={row.get('step_ms', float('nan')):6.2f} ms  "
              f"fwd={row.get('forward_ms', float('nan')):6.2f} ms", flush=True)

    k, window, block = args.tokens_per_step_main, args.window, args.block_len
    for prompt_len in args.prompt_lens:
        prompt = prompts[prompt_len]
        main = prompt_len == args.prompt_lens[0]
        for n in (args.ar_tokens if main else args.ar_tokens[:1]):
            record("ar", prompt_len, {}, ar(model, prompt, n, args.repeats))
        canvases = args.canvas if main else [1024]
        room = model.spec.max_length - prompt_len - 64  # headers of up to 8 blocks
        for canvas in [c for c in canvases if c > room]:
            print(f"  skipped canvas {canvas}: a {prompt_len}-token prompt leaves {name} room for {room}")
        for canvas in [c for c in canvases if c <= room]:
            for m in (args.blocks if canvas == 1024 and main else [4]):
                shape = nap_shape(canvas, m) | dict(window=window, tokens_per_step=k)
                record("nap_windowed", prompt_len, shape, decode(model, prompt, args.repeats, True, **shape))
        if main:
            for tps in args.tokens_per_step:
                if tps != k:
                    shape = nap_shape(1024, 4) | dict(window=window, tokens_per_step=tps)
                    record("nap_windowed", prompt_len, shape, decode(model, prompt, args.repeats, True, **shape))
            # one of the m = 4 blocks of the 1024-token canvas alone: the same windows, the same keys
            single = dict(mode="nap", blocks=1, block_len=(1024 - 128) // 4, summary_len=8, window=window,
                          tokens_per_step=k)
            record("one_block", prompt_len, single, decode(model, prompt, args.repeats, True, **single))
            shape = nap_shape(1024, 4) | dict(tokens_per_step=k)
            record("nap_exact", prompt_len, shape, decode(model, prompt, args.repeats, True, **shape))
        for canvas in (args.block_canvas if main else [1024]):
            for cache in ("dual", "prefix") if canvas == 1024 else ("dual",):
                shape = dict(mode="block", answer_len=canvas, block_len=block, cache=cache, tokens_per_step=k,
                             attention="canvas")
                record(f"block_{cache}", prompt_len, shape, decode(model, prompt, args.repeats, True, **shape))
        if main:
            shape = dict(mode="ao", answer_len=args.ao_canvas, tokens_per_step=args.ao_tokens_per_step)
            record("ao", prompt_len, shape, decode(model, prompt, args.repeats, True, **shape))
            row = {"canvas": 0, "steps": 0, "wall_s": kv_copy_ms(model, prompt) / 1e3}
            record("prompt_kv_copy", prompt_len, {}, row)
    return rows


def fastdllm(args, prompt: list[int]) -> list[dict]:
    """Fast-dLLM's own code at the same shape and settings, in a subprocess whose PYTHONPATH puts
    its transformers (4.49) first; see fastdllm_peer.py."""
    import os
    import subprocess
    import sys

    path = args.out_dir / "peer_prompt.json"
    path.write_text(json.dumps(prompt))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (args.peer_pythonpath, os.environ.get(
        "PYTHONPATH", "")) if p))
    command = [sys.executable, str(Path(__file__).with_name("fastdllm_peer.py")), "--repo", str(args.fastdllm),
               "--prompt", str(path), "--gen-length", str(args.peer_canvas), "--block-length", str(args.block_len),
               "--tokens-per-step", str(args.tokens_per_step_main)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    print(done.stdout[-3000:], done.stderr[-3000:] if done.returncode else "", flush=True)
    if done.returncode:
        return [{"mode": "fastdllm_failed", "prompt_len": len(prompt), "canvas": 0, "steps": 0, "wall_s": float("nan"),
                 "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}]
    rows = json.loads(done.stdout.strip().splitlines()[-1])["rows"]
    for row in rows:
        row["mode"] = "fastdllm_" + row["mode"]
        row["canvas"] = row["answer_len"]
    return rows


def peer_ratios(rows: list[dict], name: str, args) -> dict:
    """paradec against Fast-dLLM at the same settings, from one run."""
    out = {}
    for cache in ("dual", "prefix"):
        ours = [r for r in rows if r["model"] == name and r["mode"] == f"block_{cache}"
                and r.get("answer_len") == args.peer_canvas and r["prompt_len"] == args.prompt_lens[0]]
        peer = [r for r in rows if r["model"] == name and r["mode"] == f"fastdllm_block_{cache}"]
        if ours and peer and "step_ms" in ours[0] and "step_ms" in peer[0]:
            out[f"fastdllm_{cache}_step_over_ours"] = peer[0]["step_ms"] / ours[0]["step_ms"]
            out[f"fastdllm_{cache}_wall_over_ours"] = peer[0]["wall_s"] / ours[0]["wall_s"]
    return out


def summarise(rows: list[dict], name: str, prompt_len: int, window: int, k: int) -> dict:
    """The issue's ratios, from rows of one run."""
    def pick(mode, **where):
        for row in rows:
            if row["model"] == name and row["mode"] == mode and row["prompt_len"] == prompt_len and all(
                    row.get(key) == value for key, value in where.items()):
                return row
        return None

    out = {}
    nap4 = pick("nap_windowed", blocks=4, block_len=(1024 - 128) // 4, tokens_per_step=k)
    ar1024 = pick("ar", canvas=1024)
    single = pick("one_block")
    dual = pick("block_dual", answer_len=1024)
    if nap4 and ar1024:
        out["ar_1024_over_nap_windowed_1024"] = ar1024["wall_s"] / nap4["wall_s"]
    for label, row in (("nap_windowed", nap4), ("block_dual", dual), ("one_block", single)):
        if row and "step_ms" in row:
            out[f"{label}_step_over_forward"] = row["step_ms"] / row["forward_ms"]
    if nap4 and single and "step_ms" in nap4:
        out["nap4_step_over_one_block_step"] = nap4["step_ms"] / single["step_ms"]
    copy = pick("prompt_kv_copy")
    if single and copy and nap4:
        think_one = single["phases_s"].get("think", 0.0) * (nap4["block_len"] / single["block_len"])
        out["projected_multi_gpu_s"] = think_one + copy["wall_s"] + nap4["phases_s"].get("summary", 0.0)
        out["projection_note"] = ("one block alone on one GPU (scaled to the block length) + prompt-KV copy "
                                  "+ the summary phase; a projection, not a multi-GPU measurement")
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["model"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, name in zip(axes[0], sorted({r["model"] for r in rows})):
        for mode, style in (("ar", "o-"), ("nap_windowed", "s-"), ("block_dual", "^-")):
            points = sorted((r["canvas"], r["wall_s"]) for r in rows if r["model"] == name and r["mode"] == mode
                            and r["prompt_len"] == min(x["prompt_len"] for x in rows)
                            and r.get("blocks", 4) == 4 and r.get("tokens_per_step", 4) in (4, None))
            if points:
                ax.plot(*zip(*points), style, label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens generated (canvas)")
        ax.set_ylabel("wall time (s)")
        ax.set_title(name)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llada-8b-instruct", "dream-v0-instruct-7b"])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/gsm8k"))
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--canvas", type=int, nargs="+", default=[256, 512, 1024, 2048, 3456, 4096])
    parser.add_argument("--block-canvas", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens-per-step", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--tokens-per-step-main", type=int, default=4)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--block-len", type=int, default=32)
    parser.add_argument("--ar-tokens", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--ao-canvas", type=int, default=256)
    parser.add_argument("--ao-tokens-per-step", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hf-reference", type=int, default=0, help="tokens for transformers' generate (0: skip)")
    parser.add_argument("--fastdllm", type=Path, default=None, help="Fast-dLLM's llada/ folder: time the peer too")
    parser.add_argument("--peer-pythonpath", default="", help="put first on the peer's PYTHONPATH (transformers 4.49)")
    parser.add_argument("--peer-canvas", type=int, default=1024)
    parser.add_argument("--out-dir", type=Path, default=Path("latency-out"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("latency.py times GPU decoding; no CUDA device here")
    info = banner()
    print(NOTE)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = gsm8k_tokenizer(args.data)
    prompts = {n: packed_prompt(tokenizer, args.data, n) for n in args.prompt_lens}
    rows, summary = [], {}
    with open(args.out_dir / "rows.jsonl", "w") as log:
        for name in args.models:
            model = build(reference_config(name), device="cuda", dtype=torch.bfloat16, seed=0, tokenizer=tokenizer)
            print(f"{name}: {count_parameters(model.module) / 1e9:.2f} B parameters", flush=True)
            rows += sweep(model, name, prompts, args, log)
            summary[name] = summarise(rows, name, args.prompt_lens[0], args.window, args.tokens_per_step_main)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            if args.fastdllm and name == "llada-8b-instruct":
                peer = fastdllm(args, prompts[args.prompt_lens[0]])
                rows += [{"model": name, **row} for row in peer]
                for row in peer:
                    log.write(json.dumps({"model": name, **row}) + "\n")
                summary[name] |= peer_ratios(rows, name, args)
            if args.hf_reference:
                row = {"model": name, "mode": "hf_generate_static", "prompt_len": args.prompt_lens[0],
                       **hf_reference(name, prompts[args.prompt_lens[0]], args.hf_reference)}
                rows.append(row)
                log.write(json.dumps(row) + "\n")
                gc.collect()
                torch.cuda.empty_cache()
    plot(rows, args.out_dir / "latency_vs_canvas.png")
    print(f"\n{'model':20} {'mode':18} {'P':>5} {'m':>2} {'k':>2} {'canvas':>6} {'steps':>5} {'wall ms':>9} "
          f"{'step ms':>8} {'fwd ms':>7} {'peak GiB':>8}")
    for r in rows:
        print(f"{r['model']:20} {r['mode']:18} {r['prompt_len']:>5} {r.get('blocks', '-'):>2} "
              f"{r.get('tokens_per_step', '-'):>2} {r['canvas']:>6} {r['steps']:>5} {r['wall_s'] * 1e3:>9.1f} "
              f"{r.get('step_ms', float('nan')):>8.2f} {r.get('forward_ms', float('nan')):>7.2f} "
              f"{r.get('peak_gib', float('nan')):>8.1f}")
    for name, ratios in summary.items():
        print(name, json.dumps(ratios, indent=None))
    emit_json({"benchmark": "latency", **info, "note": NOTE, "summary": summary, "rows": rows})


if __name__ == "__main__":
    main()
