"""Does a request's answer depend on what shares its batch? Per op, end to end, and the cost of
paradec's batch-invariant mode (issue 27; ``paradec.ops.batch_invariant``).

On one GPU, bf16:

1. ``ops``: at LLaDA-8B shape, for each op of a decoding step — the q/k/v, o, gate/up and down
   projections, the output head, RMSNorm (eager, and paradec's compiled add+norm), rotary and
   SwiGLU (paradec's compiled kernels), attention over cached + fresh keys, and paradec's score
   kernel — a block of 32 rows computed alone against the same rows inside M = 64, 128, 256
   rows (placed first and last) and a single row alone: how many of the 32 rows differ in any
   bit, on the default kernels and on the batch-invariant ones.
2. ``gemm``: the projections' time at M = 32 and 256, cuBLAS against the invariant matmul
   (several tile/split settings when ``--sweep``), and attention's.
3. ``e2e``: ``paradec.generate`` of 8 prompts of mixed lengths in one batch against each alone
   (greedy, request r with seed r), block mode with the dual cache and NAP with windows, at
   paradec-tiny (trained) and LLaDA-8B shape (random weights, eos_closes_block off); each NAP
   think block decoded alone against beside the others; graphs on against off. With and without
   the mode.
4. ``cost``: step time at LLaDA-8B shape (``benchmarks/latency.py``'s ``decode`` and ``ar``):
   block dual, NAP windowed m = 4, one block alone, AR; default against the mode.

    python benchmarks/batch_invariance.py --out bi.json       # all sections
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F

from harness import banner, capture_graph, emit_json, median_ms
from paradec.ops import batch_invariant as bi

SEQ = 32  # rows of one sequence's cached step (a 32-token window or block)


def differing_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """Rows (first dim) of a and b that differ in any bit."""
    return int((a.reshape(a.shape[0], -1) != b.reshape(b.shape[0], -1)).any(1).sum())


def row_check(fn, x: torch.Tensor, unit: int = SEQ, sizes=(1, 64, 128, 256)) -> dict:
    """fn maps rows [M, ...] -> [M, ...]. The first ``unit`` rows of x alone, against the same rows
    first and last inside M rows (and the first row alone, M = 1): rows that differ."""
    alone = fn(x[:unit])
    out = {}
    for m in sizes:
        if m == 1:
            out[m] = differing_rows(fn(x[:1]), alone[:1])
            continue
        first = fn(x[:m])[:unit]
        last = fn(torch.cat((x[unit:m], x[:unit])))[-unit:]
        out[m] = max(differing_rows(first, alone), differing_rows(last, alone))
    return out


# --- 1. ops ----------------------------------------------------------------------------------------
def ops_section(args) -> list[dict]:
    from paradec import ops
    from paradec.models.layers import apply_rotary, fused_add_norm, rotate, swiglu

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    d, inter, heads, hd, vocab = 4096, 12288, 32, 128, 126464
    rows = []

    def record(op, path, result, note=""):
        rows.append({"op": op, "path": path, "differ": {str(k): v for k, v in result.items()}, "note": note})
        cells = " ".join(f"{result[m]:>5}" for m in sorted(result))
        print(f"  {op:26} {path:22} {cells}   {note}", flush=True)

    print(f"\nops at LLaDA-8B shape, bf16: rows of {SEQ} (of {SEQ}) that differ from the block computed alone")
    print(f"  {'op':26} {'path':22} {'M=1':>5} {'64':>5} {'128':>5} {'256':>5}")
    for name, n, k in (("qkv_proj", 3 * d, d), ("o_proj", d, d), ("gate_up_proj", 2 * inter, d),
                       ("down_proj", d, inter), ("lm_head", vocab, d)):
        w = torch.randn(n, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(256, k, device=dev, dtype=dt)
        record(name, "cuBLAS (F.linear)", row_check(lambda t: F.linear(t, w), x))
        record(name, "bi.matmul", row_check(lambda t: bi.matmul(t, w), x),
               f"split={bi.gemm_config(n, k, dt).split}")
    x = torch.randn(256, 2 * d, device=dev, dtype=dt)
    wn = 1 + 0.1 * torch.randn(d, device=dev, dtype=dt)
    record("rms_norm", "F.rms_norm (eager)", row_check(lambda t: F.rms_norm(t[:, :d], (d,), wn, 1e-5), x))
    record("add+rms_norm", "compiled (default)", row_check(lambda t: fused_add_norm(t[:, :d], t[:, d:], wn, 1e-5)[1], x))
    record("rms_norm", "bi.rms_norm", row_check(lambda t: bi.rms_norm(t[:, :d], wn, 1e-5), x))
    record("add+rms_norm", "bi.add_rms_norm", row_check(lambda t: bi.add_rms_norm(t[:, :d], t[:, d:], wn, 1e-5)[1], x))
    g = torch.randn(256, 2 * inter, device=dev, dtype=dt)
    record("swiglu", "compiled (default)", row_check(lambda t: swiglu(t[:, :inter], t[:, inter:]), g))
    # rotary: q and k of 8 sequences at different positions; a unit is one sequence
    qk = torch.randn(8, 2 * heads, SEQ, hd, device=dev, dtype=dt)
    pos = (torch.arange(SEQ, device=dev)[None] + 300 + 37 * torch.arange(8, device=dev)[:, None]).float()
    inv = 1.0 / (500000.0 ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd))
    ang = torch.cat(((pos[..., None] * inv),) * 2, -1)[:, None]
    cos, sin = ang.cos(), ang.sin()
    both = torch.cat((qk.flatten(1).float(), cos.flatten(1), sin.flatten(1)), 1)  # rows: sequences
    rot_fn = lambda fn: (lambda t: fn(t[:, : qk[0].numel()].to(dt).view(-1, *qk.shape[1:]),  # noqa: E731
                                      t[:, qk[0].numel(): qk[0].numel() + cos[0].numel()].view(-1, *cos.shape[1:]),
                                      t[:, qk[0].numel() + cos[0].numel():].view(-1, *sin.shape[1:])))
    record("rotary", "compiled (default)", row_check(rot_fn(rotate), both, unit=1, sizes=(2, 4, 8)),
           "units: sequences of 32 rows; columns M = 64, 128, 256")
    record("rotary", "eager", row_check(rot_fn(apply_rotary), both, unit=1, sizes=(2, 4, 8)))
    # attention over cached + fresh keys: 8 sequences, prompts of mixed lengths, 256 cached
    # canvas keys and the 32 fresh window keys; the window's 32 queries
    lens = [512, 301, 455, 388, 509, 333, 476, 420]
    canvas = 256 + SEQ
    p_max = max(lens)
    q = torch.randn(8, heads, SEQ, hd, device=dev, dtype=dt)
    kk = torch.randn(8, heads, p_max + canvas, hd, device=dev, dtype=dt)
    vv = torch.randn(8, heads, p_max + canvas, hd, device=dev, dtype=dt)
    visible = torch.ones(8, p_max + canvas, dtype=torch.bool, device=dev)
    for r, p in enumerate(lens):
        visible[r, p:p_max] = False
    mask = visible[:, None, None, :].expand(8, 1, SEQ, p_max + canvas)
    additive = torch.zeros(mask.shape, device=dev, dtype=dt).masked_fill_(~mask, float("-inf"))
    keep0 = torch.cat((torch.arange(lens[0]), torch.arange(p_max, p_max + canvas))).to(dev)

    def att_rows(fn_batch, fn_alone):
        """sequence 0 alone (fn_alone) against inside batches of 2, 4, 8 (fn_batch on the first b)."""
        alone = fn_alone()
        return {SEQ * b: differing_rows(fn_batch(b)[0].transpose(0, 1), alone[0].transpose(0, 1)) for b in (2, 4, 8)}

    sdpa = F.scaled_dot_product_attention
    record("attention", "SDPA dense (same len)", att_rows(lambda b: sdpa(q[:b], kk[:b], vv[:b]), lambda: sdpa(q[:1], kk[:1], vv[:1])),
           "columns M = 64, 128, 256 (2, 4, 8 sequences)")
    zeros = torch.zeros_like(additive)
    record("attention", "SDPA masked (same len)", att_rows(lambda b: sdpa(q[:b], kk[:b], vv[:b], attn_mask=zeros[:b]),
                                                           lambda: sdpa(q[:1], kk[:1], vv[:1], attn_mask=zeros[:1])))
    record("attention", "SDPA alone vs padded", att_rows(
        lambda b: sdpa(q[:b], kk[:b], vv[:b], attn_mask=additive[:b]),
        lambda: sdpa(q[:1], kk[:1, :, keep0], vv[:1, :, keep0])), "what decoding does: dense alone, masked batched")
    record("attention", "bi.attention alone/pad", att_rows(
        lambda b: bi.attention(q[:b], kk[:b], vv[:b], bi.masked_keys(mask[:b], additive[:b])),
        lambda: bi.attention(q[:1], kk[:1, :, keep0], vv[:1, :, keep0])))
    # paradec's score kernel (or its twin when the extension is not built)
    logits = torch.randn(256, vocab, device=dev, dtype=dt) * 4
    stops = torch.tensor([126081], device=dev)

    def score(field, fn=ops.score):
        def call(t):
            n = t.shape[0]
            s = fn(t, torch.arange(n, device=dev), 126336, stops, torch.zeros(n, dtype=torch.bool, device=dev))
            return getattr(s, field).float()[:, None]
        return call

    kernel = "paradec._C" if ops.native_on(torch.device(dev)) else "torch twin"
    for field in ("tokens", "confidence", "margin", "neg_entropy"):
        record(f"score.{field}", kernel, row_check(score(field), logits))
        record(f"score.{field}", "ops.score_twin", row_check(score(field, ops.score_twin), logits))
    return rows


# --- 2. kernel times -------------------------------------------------------------------------------
def gemm_section(args) -> list[dict]:
    dev, dt = "cuda", torch.bfloat16
    d, inter, vocab = 4096, 12288, 126464
    shapes = (("qkv_proj", 3 * d, d), ("o_proj", d, d), ("gate_up_proj", 2 * inter, d), ("down_proj", d, inter),
              ("lm_head", vocab, d))
    settings = [dict(bi.GEMM)]
    if args.sweep:
        base = dict(bi.GEMM)
        settings += [base | dict(target=256), base | dict(target=100), base | dict(block_m=128, warps=8, stages=3),
                     base | dict(block_m=128, warps=8, stages=4), base | dict(block_k=128, stages=3),
                     base | dict(serial=True)]
    saved = dict(bi.GEMM)
    out = []
    print("\nGEMM time per call (us), weights rotated over copies larger than the L2; graph replay of 8 calls")
    for name, n, k in shapes:
        copies = max(2, min(6, (256 << 20) // (n * k * 2) + 1))
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(copies)]
        for m in (32, 128, 256):
            x = torch.randn(m, k, device=dev, dtype=dt)

            def timed(fn):
                graph, _ = capture_graph(lambda: [fn(x, ws[i % copies]) for i in range(8)])
                t = median_ms(graph.replay, warmup=3, repeats=args.repeats) / 8 * 1e3
                graph.reset()
                return t

            row = {"op": name, "m": m, "n": n, "k": k, "cublas_us": timed(lambda a, w: F.linear(a, w))}
            for i, s in enumerate(settings):
                bi.GEMM.clear()
                bi.GEMM.update(s)
                try:
                    row[f"bi{i}_us"] = timed(bi.matmul)
                except Exception as err:  # noqa: BLE001 - a setting that does not compile is reported
                    row[f"bi{i}_us"] = float("nan")
                    print(f"    setting {i} failed: {type(err).__name__}: {str(err)[:200]}")
            bi.GEMM.clear()
            bi.GEMM.update(saved)
            row["weight_gbs_cublas"] = n * k * 2 / row["cublas_us"] / 1e3
            row["weight_gbs_bi0"] = n * k * 2 / row["bi0_us"] / 1e3
            out.append(row)
            cells = " ".join(f"{row[f'bi{i}_us']:8.1f}" for i in range(len(settings)))
            print(f"  {name:13} M={m:<4} cuBLAS {row['cublas_us']:8.1f} ({row['weight_gbs_cublas']:5.0f} GB/s)   "
                  f"bi {cells} ({row['weight_gbs_bi0']:5.0f} GB/s)", flush=True)
    if args.sweep:
        for i, s in enumerate(settings):
            print(f"  setting bi{i}: {s}")
    # attention at a block step's shape: 1 and 8 sequences, prompt 512, 1024 canvas keys
    heads, hd = 32, 128
    for b in (1, 8):
        c = 512 + 1024
        q = torch.randn(b, heads, SEQ, hd, device=dev, dtype=dt)
        k = torch.randn(b, heads, c, hd, device=dev, dtype=dt)
        v = torch.randn(b, heads, c, hd, device=dev, dtype=dt)
        mask = torch.ones(b, 1, SEQ, c, dtype=torch.bool, device=dev)
        additive = torch.zeros(mask.shape, dtype=dt, device=dev)
        keys = bi.masked_keys(mask, additive)

        def timed1(fn):
            graph, _ = capture_graph(fn)
            t = median_ms(graph.replay, warmup=3, repeats=args.repeats) * 1e3
            graph.reset()
            return t

        row = {"op": "attention", "batch": b, "keys": c,
               "sdpa_dense_us": timed1(lambda: F.scaled_dot_product_attention(q, k, v)),
               "sdpa_masked_us": timed1(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive)),
               "bi_dense_us": timed1(lambda: bi.attention(q, k, v)),
               "bi_masked_us": timed1(lambda: bi.attention(q, k, v, keys))}
        out.append(row)
        print(f"  attention B={b} keys={c}: SDPA dense {row['sdpa_dense_us']:.1f} masked {row['sdpa_masked_us']:.1f} "
              f"us; bi dense {row['bi_dense_us']:.1f} masked {row['bi_masked_us']:.1f} us", flush=True)
    return out


# --- 3. end to end ---------------------------------------------------------------------------------
def models(which: list[str]):
    import paradec
    from paradec.models import build, reference_config

    tiny = paradec.load("paradec-tiny", device="cuda")
    for name in which:
        if name == "tiny":
            yield name, tiny
        else:
            model = build(reference_config("llada-8b-instruct"), device="cuda", dtype=torch.bfloat16, seed=0,
                          tokenizer=tiny.tokenizer)
            yield name, model
            del model
            gc.collect()
            torch.cuda.empty_cache()


def prompts(n: int) -> list[str]:
    """Held-out problems of paradec-tiny's task: 8 questions of different lengths."""
    from paradec.train.tasks import arith

    seen, out = set(), []
    for p in arith.test_problems():
        if len(p.question) not in seen:
            seen.add(len(p.question))
            out.append(p.question)
        if len(out) == n:
            return out
    return out


SETTINGS = {
    "tiny": {"block_dual": dict(mode="block", answer_len=64, block_len=16, cache="dual", tokens_per_step=2,
                                attention="canvas"),
             "nap_windowed": dict(mode="nap", blocks=4, block_len=40, summary_len=8, window=8, tokens_per_step=2)},
    "llada-8b": {"block_dual": dict(mode="block", answer_len=256, block_len=32, cache="dual", tokens_per_step=4,
                                    attention="canvas", eos_closes_block=False),
                 "nap_windowed": dict(mode="nap", blocks=4, block_len=64, summary_len=32, window=32, tokens_per_step=4,
                                      eos_closes_block=False)},
}


def batch_vs_alone(model, texts, settings) -> dict:
    import paradec

    paradec.engine_for(model).release_kept()
    t0 = time.perf_counter()
    batch = paradec.generate(model, texts, seed=0, **settings)
    equal = traces = differing = total = 0
    for r, text in enumerate(texts):
        alone = paradec.generate(model, text, seed=r, **settings)
        a, b = alone.token_ids, batch[r].token_ids
        equal += int(a == b)
        traces += int(alone.trace == batch[r].trace)
        differing += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        total += len(a)
    graphs_off = paradec.generate(model, texts, seed=0, cuda_graphs=False, **settings)
    graph_equal = sum(int(x.token_ids == y.token_ids) for x, y in zip(graphs_off, batch))
    paradec.engine_for(model).release_kept()
    return {"requests_equal": equal, "requests": len(texts), "positions_differing": differing, "positions": total,
            "traces_equal": traces,
            "graphs_off_equal": graph_equal, "seconds": time.perf_counter() - t0}


def blocks_alone(model, text, settings) -> dict:
    """Each NAP think block decoded alone against beside the others (one request, one GPU)."""
    from paradec import GenerationConfig
    from paradec.api import build_layout, encode_prompt
    from paradec.decoding.runner import Runner

    config = GenerationConfig(seed=0, **settings)
    layout = build_layout(model, config)
    ids = encode_prompt(model, text, config, layout)
    runner = Runner(model, config, layout, [ids])
    together = runner.run().canvas.clone()
    runner.release()
    equal = differing = 0
    for j in range(config.blocks):
        runner = Runner(model, config, layout, [ids], think_blocks=[j])
        alone = runner.run().canvas
        runner.release()
        s, e = layout.bodies[j]
        n = int((alone[0, s:e] != together[0, s:e]).sum())
        equal += int(n == 0)
        differing += n
    return {"blocks_equal": equal, "blocks": config.blocks, "block_positions_differing": differing}


def engine_vs_alone(model, texts, settings: list[dict]) -> dict:
    """The continuous-batching engine (paradec.batching, CUDA graphs from its warm-up): request
    i with settings[i % len(settings)] and seed i joins the running batch one engine step after
    the one before; each result against ``generate()`` of the request alone."""
    import paradec
    from paradec.api import build_layout, resolve_config
    from paradec.batching import BatchEngine

    t0 = time.perf_counter()
    invariant = bi.enabled()
    configs = [resolve_config(model, seed=i, batch_invariant=invariant, **settings[i % len(settings)])
               for i in range(len(texts))]
    engine = BatchEngine(model, max_batch=len(texts), max_prompt_tokens=max(64, max(map(len, texts))),
                         max_canvas_tokens=max(build_layout(model, c).length for c in configs),
                         batch_invariant=invariant)
    engine.warm_up(configs)
    results = {}
    for i, (text, config) in enumerate(zip(texts, configs)):
        engine.add(str(i), text, config)
        results.update({o.request_id: o.result for o in engine.step() if o.finished})
    while engine.has_unfinished():
        results.update({o.request_id: o.result for o in engine.step() if o.finished})
    replays, calls = engine.stats.graph_replays, engine.stats.step_calls
    del engine
    equal = traces = differing = total = 0
    for i, (text, config) in enumerate(zip(texts, configs)):
        alone = paradec.generate(model, text, config)
        a, b = alone.token_ids, results[str(i)].token_ids
        equal += int(a == b)
        traces += int(alone.trace == results[str(i)].trace)
        differing += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
        total += len(a)
    paradec.engine_for(model).release_kept()
    return {"requests_equal": equal, "requests": len(texts), "positions_differing": differing, "positions": total,
            "traces_equal": traces, "graph_replays": replays, "step_calls": calls,
            "seconds": time.perf_counter() - t0}


def e2e_section(args) -> list[dict]:
    out = []
    texts = prompts(8)
    print("\nend to end: 8 prompts batched against each alone (greedy, request r with seed r)")
    print(f"  {'model':9} {'mode':13} {'kernels':9} {'equal':>6} {'positions differing':>20} {'graphs off = on':>16} "
          f"{'blocks alone = beside':>22} {'traces equal':>13}")
    for name, model in models(args.models):
        cases = [(mode, settings, texts, "mixed") for mode, settings in SETTINGS[name].items()]
        if name == "llada-8b":  # the same prompts cut to one token length
            ids = [model.tokenizer.encode(t, add_special_tokens=False) for t in texts]
            same = [x[: min(map(len, ids))] for x in ids]
            cases.append(("block_dual", SETTINGS[name]["block_dual"], same, "same"))
        for mode, settings, inputs, lengths in cases:
            for invariant in (False, True):
                with bi.batch_invariant(invariant):
                    row = {"model": name, "mode": mode, "lengths": lengths, "invariant": invariant,
                           **batch_vs_alone(model, inputs, settings)}
                    if mode == "nap_windowed":
                        row |= blocks_alone(model, inputs[0], settings)
                out.append(row)
                blocks = f"{row['blocks_equal']}/{row['blocks']}" if "blocks" in row else "-"
                print(f"  {name:9} {mode + ('' if lengths == 'mixed' else ' same') :13} {'invariant' if invariant else 'default':9} "
                      f"{row['requests_equal']:>3}/{row['requests']:<2} {row['positions_differing']:>9}/{row['positions']:<10} "
                      f"{row['graphs_off_equal']:>10}/{row['requests']:<5} {blocks:>22} {row['traces_equal']:>10}/{row['requests']:<2}"
                      f"   ({row['seconds']:.0f} s)",
                      flush=True)
        mixed = list(SETTINGS[name].values())  # the engine: both modes' requests in one batch
        for invariant in (False, True):
            with bi.batch_invariant(invariant):
                row = {"model": name, "mode": "engine_mixed", "lengths": "mixed", "invariant": invariant,
                       **engine_vs_alone(model, texts, mixed)}
            out.append(row)
            kernels = "invariant" if invariant else "default"
            print(f"  {name:9} {'engine mixed':13} {kernels:9} {row['requests_equal']:>3}/{row['requests']:<2} "
                  f"{row['positions_differing']:>9}/{row['positions']:<10} {'-':>16} {'-':>22} "
                  f"{row['traces_equal']:>10}/{row['requests']:<2}   ({row['graph_replays']}/{row['step_calls']} "
                  f"step calls replayed, {row['seconds']:.0f} s)", flush=True)
    return out


# --- 4. cost ---------------------------------------------------------------------------------------
def cost_section(args) -> list[dict]:
    from latency import ar, decode, nap_shape

    from paradec.models import build, reference_config
    from paradec.train.tasks import arith

    import paradec

    tiny = paradec.load("paradec-tiny")
    model = build(reference_config("llada-8b-instruct"), device="cuda", dtype=torch.bfloat16, seed=0,
                  tokenizer=tiny.tokenizer)
    ids: list[int] = []
    for p in arith.test_problems():
        ids += tiny.tokenizer.encode(p.question + " ", add_special_tokens=False)
        if len(ids) >= args.prompt_len:
            break
    prompt = ids[: args.prompt_len]
    k, window = 4, 32
    cases = {
        "block_dual": dict(mode="block", answer_len=args.canvas, block_len=32, cache="dual", tokens_per_step=k,
                           attention="canvas"),
        "nap_windowed": nap_shape(args.canvas, 4) | dict(window=window, tokens_per_step=k),
        "one_block": dict(mode="nap", blocks=1, block_len=(args.canvas - 128) // 4, summary_len=8, window=window,
                          tokens_per_step=k),
    }
    out = []
    saved = dict(bi.GEMM)
    variants = [None] + [dict(saved) | json.loads(g) for g in args.cost_gemm]  # None: the default kernels
    print(f"\nstep cost at LLaDA-8B shape (prompt {len(prompt)}, canvas {args.canvas}, k = {k}; CUDA graphs); "
          f"invariant GEMM settings: " + "; ".join(f"inv{i}={g}" for i, g in enumerate(variants[1:])))
    print(f"  {'mode':13} {'default ms':>11} " + " ".join(f"{f'inv{i} ms':>9} {'ratio':>6}" for i in range(len(variants) - 1))
          + "   wall s (default, inv...)")
    for mode in list(cases) + ["ar"]:
        row = {"mode": mode}
        for i, gemm in enumerate(variants):
            key = "default" if gemm is None else f"inv{i - 1}"
            bi.GEMM.update(gemm or saved)
            try:
                with bi.batch_invariant(gemm is not None):
                    if mode == "ar":
                        r = ar(model, prompt, args.ar_tokens, args.cost_repeats)
                        r["step_ms"] = r["token_ms"]
                    else:
                        r = decode(model, prompt, args.cost_repeats, True, **cases[mode])
            finally:
                bi.GEMM.update(saved)
            row[f"{key}_step_ms"] = r.get("step_ms", float("nan"))
            row[f"{key}_refresh_ms"] = r.get("refresh_ms", float("nan"))
            row[f"{key}_wall_s"] = r["wall_s"]
            if gemm is not None:
                row[f"{key}_gemm"] = gemm
                row[f"{key}_ratio"] = row[f"{key}_step_ms"] / row["default_step_ms"]
        out.append(row)
        cells = " ".join(f"{row[f'inv{i}_step_ms']:>9.2f} {row[f'inv{i}_ratio']:>6.3f}" for i in range(len(variants) - 1))
        walls = ", ".join(f"{row[f'{key}_wall_s']:.3f}" for key in ["default"] + [f"inv{i}" for i in range(len(variants) - 1)])
        print(f"  {mode:13} {row['default_step_ms']:>11.2f} {cells}   {walls}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=["ops", "gemm", "e2e", "cost"],
                        choices=["ops", "gemm", "e2e", "cost"])
    parser.add_argument("--models", nargs="+", default=["tiny", "llada-8b"], choices=["tiny", "llada-8b"])
    parser.add_argument("--sweep", action="store_true", help="time several invariant GEMM settings")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--canvas", type=int, default=1024)
    parser.add_argument("--ar-tokens", type=int, default=128)
    parser.add_argument("--cost-repeats", type=int, default=1)
    parser.add_argument("--cost-gemm", nargs="+", default=["{}"],
                        help="invariant GEMM settings (JSON dicts over bi.GEMM) to time the mode with")
    parser.add_argument("--out", help="also write the JSON record here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("batch_invariance.py measures GPU kernels; no CUDA device here")
    info = banner()
    import triton

    from paradec import ops

    info |= {"triton": triton.__version__, "score_kernel": "paradec._C" if ops.native_on(torch.device("cuda")) else "twin",
             "gemm": dict(bi.GEMM), "kv_split": bi.KV_SPLIT}
    print(f"triton {triton.__version__}; invariant GEMM {bi.GEMM}; KV split {bi.KV_SPLIT}")
    record = {"benchmark": "batch_invariance", **info}
    sections = {"ops": ops_section, "gemm": gemm_section, "e2e": e2e_section, "cost": cost_section}
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            record[name] = sections[name](args)
        except Exception as err:  # noqa: BLE001 - the other sections still run and report
            import traceback

            traceback.print_exc()
            record[name] = {"error": f"{type(err).__name__}: {err}"}
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(record, f)
    emit_json(record)


if __name__ == "__main__":
    main()
