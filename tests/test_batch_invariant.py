"""paradec.ops.batch_invariant: each kernel against its plain-torch twin, and bit-for-bit the same rows
whatever shares the call (issue 27).

On a GPU the kernels run compiled (``@pytest.mark.cuda``). Without one, where triton is
installed, the same checks run in Triton's interpreter (``TRITON_INTERPRET=1``, in a child
process: the variable must be set before the kernels are defined), with the model layer routed
through them on the CPU; where triton is missing they are skipped. Inputs are fresh random draws
for every check; tolerances are justified where they are set.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from paradec.ops import batch_invariant as bi

from interpreted import run_interpreted

HERE = Path(__file__).parent
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
needs_triton = pytest.mark.skipif(not bi.HAVE_TRITON, reason="triton is not installed")
# One rounding of the output dominates: bf16 keeps 8 mantissa bits (2**-8 ~ 4e-3 relative), fp16
# 11; sums of a few hundred O(1) products in fp32 add ~1e-6. fp32 runs IEEE fp32 on both sides.
TOL = {torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype, device, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(device=device, dtype=dtype)


# --- the checks, on any device ----------------------------------------------------------------
def check_matmul(device: str, dtype: torch.dtype, shapes=((96, 200, 300), (130, 64, 1024), (7, 40, 48))) -> None:
    for i, (m, n, k) in enumerate(shapes):
        for bias in (False, True):
            x = _randn(m, k, seed=10 * i, dtype=dtype, device=device)
            w = _randn(n, k, seed=10 * i + 1, dtype=dtype, device=device, scale=k**-0.5)
            b = _randn(n, seed=10 * i + 2, dtype=dtype, device=device) if bias else None
            got = bi.matmul(x, w, b)
            torch.testing.assert_close(got, bi.matmul_twin(x, w, b), **TOL[dtype])
            # Every row alone, inside fewer or more rows, first or last, permuted: the same bits.
            for rows in (torch.arange(1), torch.arange(m - 1, m), torch.arange(min(m, 33)),
                         torch.randperm(m, generator=_gen(i))):
                rows = rows.to(device)
                assert torch.equal(bi.matmul(x[rows], w, b), got[rows]), (m, n, k, bias, rows[:4].tolist())
            bigger = torch.cat((_randn(3 * m, k, seed=10 * i + 3, dtype=dtype, device=device), x))
            assert torch.equal(bi.matmul(bigger, w, b)[3 * m:], got)
    # A split-K shape: the serial sum and the two-kernel sum give the same bits.
    x = _randn(70, 2048, seed=5, dtype=dtype, device=device)
    w = _randn(64, 2048, seed=6, dtype=dtype, device=device, scale=2048**-0.5)
    assert bi.gemm_config(64, 2048, dtype).split > 1
    serial = bi.GEMM["serial"]
    try:
        bi.GEMM["serial"] = True
        a = bi.matmul(x, w)
        bi.GEMM["serial"] = False
        b = bi.matmul(x, w)
    finally:
        bi.GEMM["serial"] = serial
    assert torch.equal(a, b)
    torch.testing.assert_close(a, bi.matmul_twin(x, w), **TOL[dtype])
    assert torch.equal(bi.matmul(x[:1], w), a[:1]) and torch.equal(bi.matmul(x[40:], w), a[40:])


def check_norms(device: str, dtype: torch.dtype) -> None:
    for d in (64, 200):
        x = _randn(3, 17, d, seed=d, dtype=dtype, device=device)
        r = _randn(3, 17, d, seed=d + 1, dtype=dtype, device=device)
        w = _randn(d, seed=d + 2, dtype=dtype, device=device, scale=0.1) + 1
        got = bi.rms_norm(x, w, 1e-5)
        torch.testing.assert_close(got, bi.rms_norm_twin(x, w, 1e-5), **TOL[dtype])
        total, normed = bi.add_rms_norm(x, r, w, 1e-5)
        ref_total, ref_normed = bi.add_rms_norm_twin(x, r, w, 1e-5)
        if device == "cuda":  # one rounding of an fp32 sum, as torch's add (the interpreter may truncate)
            assert torch.equal(total, ref_total)
        torch.testing.assert_close(total, ref_total, **TOL[dtype])
        torch.testing.assert_close(normed, ref_normed, **TOL[dtype])
        flat = x.reshape(-1, d)
        for rows in (torch.arange(1), torch.arange(20, 51)):
            assert torch.equal(bi.rms_norm(flat[rows.to(device)], w, 1e-5), got.reshape(-1, d)[rows.to(device)])


def _padded_batch(device, dtype, prompt_lens, canvas, heads, kv_heads, d, seed):
    """Keys as a batch holds them: [prompt, right padding, canvas]; and each request alone."""
    p_max = max(prompt_lens)
    b = len(prompt_lens)
    k = _randn(b, kv_heads, p_max + canvas, d, seed=seed, dtype=dtype, device=device)
    v = _randn(b, kv_heads, p_max + canvas, d, seed=seed + 1, dtype=dtype, device=device)
    q = _randn(b, heads, canvas, d, seed=seed + 2, dtype=dtype, device=device)
    visible = torch.ones(b, p_max + canvas, dtype=torch.bool, device=device)
    for r, p in enumerate(prompt_lens):
        visible[r, p:p_max] = False
    mask = visible[:, None, None, :].expand(b, 1, canvas, p_max + canvas)
    additive = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    return q, k, v, mask, additive


def check_attention(device: str, dtype: torch.dtype, d: int = 32, canvas: int = 40,
                    prompt_lens=(600, 37, 512)) -> None:
    heads, kv_heads = 4, 2
    q, k, v, mask, additive = _padded_batch(device, dtype, prompt_lens, canvas, heads, kv_heads, d, seed=d)
    got = bi.attention(q, k, v, additive)
    torch.testing.assert_close(got, bi.attention_twin(q, k, v, additive), **TOL[dtype])
    assert torch.equal(bi.attention(q, k, v, bi.masked_keys(mask, additive)), got)
    p_max = max(prompt_lens)
    for r, p in enumerate(prompt_lens):
        keep = torch.cat((torch.arange(p), torch.arange(p_max, p_max + canvas))).to(device)
        alone = bi.attention(q[r:r + 1], k[r:r + 1, :, keep], v[r:r + 1, :, keep])  # no padding, no mask
        assert torch.equal(alone, got[r:r + 1]), r
        some = bi.attention(q[r:r + 1, :, 5:9], k[r:r + 1, :, keep], v[r:r + 1, :, keep])  # fewer queries
        assert torch.equal(some, got[r:r + 1, :, 5:9]), r
    # A mask inside the visible keys (another block's keys) still gives the twin's answer.
    inner = additive.clone()
    inner[:, :, : canvas // 2, -canvas // 2:] = float("-inf")
    torch.testing.assert_close(bi.attention(q, k, v, inner), bi.attention_twin(q, k, v, inner), **TOL[dtype])
    check_grouped_attention(device, dtype, d)


def check_grouped_attention(device: str, dtype: torch.dtype, d: int, seed: int = 0) -> None:
    """Queries grouped by attention segment: a think block's queries in a row holding the prompt,
    every block, a summary and padding (masked, queries of all blocks shuffled together) equal
    the same queries in a row of the prompt and that block alone (unmasked), as a block decoded
    alone has them; and the twin's answer."""
    from paradec.models.attention import PAD, PROMPT, SUMMARY, attention_mask

    gen = _gen(seed)
    prompt, block, blocks, heads, kv_heads = 37, 23, 4, 4, 2
    layout = [PROMPT] * prompt + [j + 1 for j in range(blocks) for _ in range(block)] + [SUMMARY] * 5 + [PAD] * 3
    segments = torch.tensor(layout, device=device)[None]
    c = len(layout)
    k = _randn(1, kv_heads, c, d, seed=seed + 1, dtype=dtype, device=device)
    v = _randn(1, kv_heads, c, d, seed=seed + 2, dtype=dtype, device=device)
    columns = [prompt + j * block + i for j in range(blocks) for i in range(5, 13)] + [c - 5, c - 1]
    columns = [columns[i] for i in torch.randperm(len(columns), generator=gen).tolist()]
    q = _randn(1, heads, len(columns), d, seed=seed + 3, dtype=dtype, device=device)
    query_segments = segments[:, columns]
    mask = attention_mask(query_segments, segments, "isolated")
    additive = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill_(~mask, float("-inf"))
    got = bi.attention(q, k, v, bi.masked_keys(mask, additive, query_segments - SUMMARY))
    torch.testing.assert_close(got, bi.attention_twin(q, k, v, additive), **TOL[dtype])
    for j in range(blocks):
        keep = torch.tensor(list(range(prompt)) + list(range(prompt + j * block, prompt + (j + 1) * block)),
                            device=device)
        mine = [i for i, col in enumerate(columns) if layout[col] == j + 1]
        alone = bi.attention(q[:, :, mine], k[:, :, keep], v[:, :, keep])
        assert torch.equal(alone, got[:, :, mine]), j


def check_model(device: str, dtype: torch.dtype, root_dir: Path, decode=("llada", "dream"),
                modes=("block", "nap")) -> None:
    """The tiny models routed through the kernels: close to the default path, and (for the
    families in ``decode``) a request's tokens the same batched (mixed prompt lengths) as alone,
    in ``modes``: block-dual and NAP-window."""
    import paradec

    sys.path.insert(0, str(HERE))
    from tiny import tiny_checkpoint

    prompts = ["the 3 + 4 is ?", "a b c d e f g h i j k l m n o p q r s", "1 2"]
    if device != "cuda":  # (Triton's interpreter: a program instance at a time)
        prompts = [prompts[0], prompts[2]]
    for family in ("llada", "dream"):
        # (Triton's interpreter runs an attention program at a time: two heads, not four, there)
        narrow = dict(n_heads=2, n_kv_heads=2) if device != "cuda" and family == "llada" else {}
        root, _, _ = tiny_checkpoint(root_dir / family, family, seed=7, **narrow)
        model = paradec.load(root, device=device, dtype=dtype)
        ids = torch.tensor([[5, 9, 14, 22, 31, 7, 8, 40, 41, 42]], device=device)
        positions = torch.arange(ids.shape[1], device=device)[None]
        segments = torch.zeros_like(ids)
        default = model(ids, positions, segments, "canvas")
        with bi.batch_invariant():
            routed = model(ids, positions, segments, "canvas")
        # Two bf16 paths through the stack, each a few roundings from the exact value (~1e-2; the
        # interpreter also truncates where the GPU rounds): compared by relative norm.
        error = ((routed.double() - default.double()).norm() / default.double().norm()).item()
        assert error < 3e-2, (family, error)
        if family not in decode:
            continue
        scale = 2 if device == "cuda" else 1  # (Triton's interpreter takes ~10 s a step here)
        settings = [dict(mode="block", answer_len=8 * scale, block_len=4 * scale, cache="dual", tokens_per_step=2,
                         attention="canvas"),
                    dict(mode="nap", blocks=2, block_len=6 * scale, summary_len=2 * scale, window=3 * scale,
                         tokens_per_step=2)]
        for config in [c for c in settings if c["mode"] in modes]:
            with bi.batch_invariant():
                paradec.engine_for(model).release_kept()
                batch = paradec.generate(model, prompts, seed=3, eos_closes_block=False, **config)
                for r, prompt in enumerate(prompts):
                    alone = paradec.generate(model, prompt, seed=3 + r, eos_closes_block=False, **config)
                    assert alone.token_ids == batch[r].token_ids and alone.trace == batch[r].trace, (family, config)
                paradec.engine_for(model).release_kept()


def run_kernels(device: str, dtype: torch.dtype) -> None:
    """Every kernel check at ``dtype`` (an interpreted child's part)."""
    check_matmul(device, dtype)
    check_norms(device, dtype)
    check_attention(device, dtype)
    check_attention(device, dtype, d=16, canvas=3, prompt_lens=(5, 70))


# --- on the CPU, in Triton's interpreter ------------------------------------------------------
def fixed_order_interpreter_dot() -> None:
    """The interpreter's ``tl.dot`` is numpy's matmul, whose BLAS may round a row differently by
    its place in the tile (numpy 2.4's OpenBLAS 0.3.31 does: a row alone differs from the same
    row among others), where a GPU's dot does not. Here each output sums its products in one
    fixed order (numpy's einsum loop, no BLAS), so the checks test the kernels' logic, not the
    host BLAS's blocking."""
    import numpy as np
    from triton.runtime import interpreter

    blas_dot = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.primitive_bitwidth == 8 or b.dtype.primitive_bitwidth == 8:  # fp8 and ints: as before
            return blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = d.data.dtype
        products = np.einsum("...ik,...kj->...ij", a.data.astype(acc), b.data.astype(acc))
        return interpreter.TensorHandle(products + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot


@needs_triton
def test_kernels_in_the_triton_interpreter(tmp_path):
    """The kernels' logic (indexing, splits, key order, routing) on the CPU: interpreted children
    (``run_interpreted``: bf16, fp32 and the model side by side; the interpreter computes bf16
    dots in fp32, in a fixed order: ``fixed_order_interpreter_dot``). Attention splits the keys
    every 128 there (``KV_SPLIT``; 512 on a GPU): a program's loop runs its whole split, padding
    included, and the interpreter runs it a program at a time; every split path is still taken,
    more splits a row than at 512. The model decodes in NAP windows only (the block-dual decode
    runs on a GPU). ~80 s in one child, ~45 s in three, on 2 cores."""
    setup = ("import test_batch_invariant as t; from paradec.ops import batch_invariant as bi; "
             "bi.DEVICES.add('cpu'); bi.KV_SPLIT = 128; t.fixed_order_interpreter_dot()")
    parts = [f"t.run_kernels('cpu', torch.{dtype})" for dtype in ("bfloat16", "float32")]
    parts.append(f"t.check_model('cpu', torch.bfloat16, __import__('pathlib').Path({str(tmp_path)!r}), "
                 "decode=('llada',), modes=('nap',))")
    run_interpreted(setup, parts, env={"PARADEC_BATCH_INVARIANT": "0"})


def test_switch():
    assert not bi.enabled() or os.environ.get(bi.ENV) == "1"
    before = bi.enabled()
    x = torch.zeros(2)
    with bi.batch_invariant(True):
        assert bi.enabled()
        assert not bi.active(x)  # CPU tensors keep the default kernels
        with torch.enable_grad(), bi.batch_invariant(False):
            assert not bi.enabled()
    assert bi.enabled() == before


def test_without_triton_the_mode_switches_and_only_a_device_op_in_it_raises(monkeypatch):
    """A CPU-only install (torch's CPU wheels ship no triton) can ask for the mode: CPU paths
    never change. An op on a device whose kernels are Triton's raises, naming triton."""
    monkeypatch.setattr(bi, "HAVE_TRITON", False)
    x = torch.zeros(2)
    with bi.batch_invariant(True), torch.no_grad():
        assert bi.enabled() and not bi.active(x)
        monkeypatch.setattr(bi, "DEVICES", {"cpu"})  # as if x were on CUDA
        with pytest.raises(RuntimeError, match="the batch-invariant mode on cpu needs triton"):
            bi.active(x)
        with torch.enable_grad():
            assert not bi.active(x)  # training keeps the default kernels: nothing to refuse


def test_cpu_model_paths_unchanged(tmp_path):
    """On the CPU the mode changes nothing: the same logits bit for bit."""
    import paradec

    from tiny import tiny_checkpoint

    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=2)
    model = paradec.load(root)
    ids = torch.tensor([[5, 9, 14, 22, 31, 7]])
    positions = torch.arange(6)[None]
    segments = torch.zeros_like(ids)
    default = model(ids, positions, segments, "canvas")
    with bi.batch_invariant(bi.HAVE_TRITON):
        assert torch.equal(model(ids, positions, segments, "canvas"), default)


# --- on a GPU ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("check", [check_matmul, check_norms, check_attention])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernels(check, dtype):
    check("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matmul_at_model_shapes():
    """LLaDA-8B's projection shapes, split-K and not: rows at M = 1..256 equal the rows of M = 256."""
    for n, k in ((12288, 4096), (4096, 4096), (4096, 12288), (126464, 4096)):
        x = _randn(256, k, seed=n, dtype=torch.bfloat16, device="cuda")
        w = _randn(n, k, seed=k, dtype=torch.bfloat16, device="cuda", scale=k**-0.5)
        full = bi.matmul(x, w)
        torch.testing.assert_close(full, bi.matmul_twin(x, w), **TOL[torch.bfloat16])
        for m in (1, 32, 64, 128):
            assert torch.equal(bi.matmul(x[-m:], w), full[-m:]), (n, k, m)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_model_batch_equals_alone(tmp_path):
    check_model("cuda", torch.bfloat16, tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_on_and_off_agree_in_the_mode():
    import paradec

    model = paradec.load("paradec-tiny", device="cuda")
    config = dict(mode="nap", blocks=2, block_len=24, summary_len=8, window=8, tokens_per_step=2)
    with bi.batch_invariant():
        paradec.engine_for(model).release_kept()
        on = paradec.generate(model, ["1 + 2", "3 + 4 + 5"], seed=0, cuda_graphs=True, **config)
        off = paradec.generate(model, ["1 + 2", "3 + 4 + 5"], seed=0, cuda_graphs=False, **config)
        paradec.engine_for(model).release_kept()
    assert [r.token_ids for r in on] == [r.token_ids for r in off]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_8b_width_decodes_the_same_in_any_company():
    """LLaDA-8B's widths (4096 hidden, 32 heads, 12288 MLP, 126464 vocab; 2 of its 32 layers),
    random bf16 weights, in the mode (the ``batch_invariant=True`` setting): requests of mixed
    lengths batched equal each alone (block with the dual cache, NAP windows side by side), each
    think block decoded alone equals it beside the others, and graphs on equal graphs off."""
    import paradec
    from paradec.api import build_layout, encode_prompt
    from paradec.decoding.runner import Runner
    from paradec.models import build, reference_config

    tiny = paradec.load("paradec-tiny")
    model = build(reference_config("llada-8b-instruct") | {"n_layers": 2}, device="cuda", dtype=torch.bfloat16,
                  seed=0, tokenizer=tiny.tokenizer)
    texts = ["1 + 2 + 3 =", "what is 12 times 7, and then add 5 to it?", "9 - 4", "two plus two is four; three"]
    settings = {"block": dict(mode="block", answer_len=64, block_len=16, cache="dual", tokens_per_step=4,
                              attention="canvas", eos_closes_block=False, batch_invariant=True),
                "nap": dict(mode="nap", blocks=4, block_len=32, summary_len=16, window=16, tokens_per_step=4,
                            eos_closes_block=False, batch_invariant=True)}
    for name, config in settings.items():
        paradec.engine_for(model).release_kept()
        batch = paradec.generate(model, texts, seed=0, **config)
        off = paradec.generate(model, texts, seed=0, cuda_graphs=False, **config)
        assert [r.token_ids for r in off] == [r.token_ids for r in batch], name
        for r, text in enumerate(texts):
            assert paradec.generate(model, text, seed=r, **config).token_ids == batch[r].token_ids, (name, r)
    generation = paradec.GenerationConfig(seed=0, **settings["nap"])
    layout = build_layout(model, generation)
    ids = [encode_prompt(model, texts[1], generation, layout)]
    together = Runner(model, generation, layout, ids, summary=False).run().canvas
    for j in range(4):
        alone = Runner(model, generation, layout, ids, think_blocks=[j], summary=False).run().canvas
        s, e = layout.bodies[j]
        assert torch.equal(alone[0, s:e], together[0, s:e]), j
    paradec.engine_for(model).release_kept()


def test_the_setting_applies_for_the_call_only(tmp_path):
    """``batch_invariant=True`` turns the mode on while a runner decodes and back off after; on a
    CPU the tokens do not change."""
    import paradec

    from tiny import tiny_checkpoint

    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=4)
    model = paradec.load(root)
    seen = []
    kw = dict(blocks=2, block_len=6, summary_len=3, tokens_per_step=2)
    with bi.batch_invariant(False):
        on = paradec.generate(model, "1 2 3", batch_invariant=True, on_step=lambda *_: seen.append(bi.enabled()), **kw)
        assert not bi.enabled() and seen and all(seen)
        assert paradec.generate(model, "1 2 3", **kw).token_ids == on.token_ids


def _engine_equals_alone(model, prompts, settings) -> None:
    """A BatchEngine in the mode (CUDA graphs captured at warm-up), requests of mixed settings
    arriving at staggered steps: each request's tokens and trace equal ``generate()`` of it alone."""
    import paradec
    from paradec.api import resolve_config
    from paradec.batching import BatchEngine

    configs = [resolve_config(model, seed=i, eos_closes_block=False, batch_invariant=True, **s)
               for i, s in enumerate(settings)]
    alone = [paradec.generate(model, p, c) for p, c in zip(prompts, configs)]
    engine = BatchEngine(model, max_batch=len(prompts), max_prompt_tokens=128, max_canvas_tokens=512,
                         batch_invariant=True)
    engine.warm_up(configs)
    results = {}
    for i, (prompt, config) in enumerate(zip(prompts, configs)):
        engine.add(str(i), prompt, config)
        for _ in range(i % 3):  # the next request joins a batch already decoding
            results.update({o.request_id: o.result for o in engine.step() if o.finished})
    while engine.has_unfinished():
        results.update({o.request_id: o.result for o in engine.step() if o.finished})
    assert engine.stats.graph_replays > 0
    for i, solo in enumerate(alone):
        got = results[str(i)]
        assert (got.token_ids, got.trace) == (solo.token_ids, solo.trace), (i, settings[i])


ENGINE_SETTINGS = [
    dict(mode="nap", blocks=4, block_len=32, summary_len=16, window=16, tokens_per_step=4),  # side by side alone
    dict(mode="block", answer_len=64, block_len=16, cache="dual", tokens_per_step=2, attention="canvas"),
    dict(mode="nap", blocks=2, block_len=24, summary_len=8, tokens_per_step=2, policy="margin"),
    dict(mode="nap", blocks=3, block_len=16, summary_len=8, window=8, tokens_per_step=2, temperature=0.8),
    dict(mode="nap", blocks=4, block_len=24, summary_len=8, policy="threshold", threshold=0.6),
    dict(mode="block", answer_len=48, block_len=16, cache="prefix", tokens_per_step=4),
    dict(mode="nap", blocks=2, block_len=24, summary_len=8, tokens_per_step=2, temperature=0.7, top_p=0.9,
         score_on="sampling"),
]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("width", ["tiny", "8b"])
def test_cuda_engine_decodes_each_request_as_alone_in_the_mode(width):
    """Contract 7 on a GPU in bf16: mixed settings, mixed prompt lengths, staggered arrivals in
    the continuous-batching engine equal each request decoded alone (whose NAP think blocks
    step side by side, each in a row of its own, where the engine masks them in one row)."""
    import paradec
    from paradec.models import build, reference_config

    tiny = paradec.load("paradec-tiny", device="cuda", dtype=torch.bfloat16)
    model = tiny if width == "tiny" else build(reference_config("llada-8b-instruct") | {"n_layers": 2},
                                               device="cuda", dtype=torch.bfloat16, seed=0,
                                               tokenizer=tiny.tokenizer)
    prompts = ["1 + 2 + 3 =", "what is 12 times 7, and then add 5 to it?", "9 - 4", "two plus two is four; three",
               "7 * 8 - 6 =", "a long prompt: " + " ".join(str(i) for i in range(30)), "5 + 5"]
    _engine_equals_alone(model, prompts, ENGINE_SETTINGS)
    paradec.engine_for(model).release_kept()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("vocab", [126464, 1000])
def test_cuda_score_rows_do_not_depend_on_their_neighbours_in_the_mode(vocab):
    """Scoring in the mode: a row scored alone, among a few or among 512 rows (where the
    default kernel picks other splits) gives the same token and the same score bits — the
    kernel (greedy, sampled) and the twin that filtered sampling takes (top-k/top-p, scores on
    the sampling distribution)."""
    from paradec import ops
    from paradec.ops.scoring import Sampling

    logits = _randn(512, vocab, seed=vocab, dtype=torch.bfloat16, device="cuda", scale=3.0)
    stops = torch.tensor([2, 5], device="cuda")
    noise = torch.rand(512, vocab, generator=_gen(1), dtype=torch.float64).clamp_(1e-12, 1 - 1e-12).cuda()
    cases = [(0.0, Sampling()), (0.7, Sampling()), (0.7, Sampling(top_k=50, top_p=0.9, score_on="sampling")),
             (0.0, Sampling(score_on="sampling"))]
    with bi.batch_invariant():
        for temperature, sampling in cases:
            def scored(rows):
                rows = torch.as_tensor(rows, device="cuda")
                bar = rows % 2 == 0
                out = ops.score(logits, rows, 3, stops, bar, temperature, noise[rows] if temperature else None,
                                sampling)
                return torch.stack((out.tokens.double(), out.confidence.double(), out.margin.double(),
                                    out.neg_entropy.double()), 1)

            every = scored(range(512))
            for rows in ([0], [511], list(range(7)), list(range(100, 164))):
                assert torch.equal(scored(rows), every[rows]), (temperature, sampling, rows[:3])
