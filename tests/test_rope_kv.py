"""``paradec.ops.rope_kv`` (rotary of q and k fused with writing k and v into pool rows) against
its plain-torch twin, on fresh random inputs: on a GPU directly; on the CPU in Triton's
interpreter (a child process with TRITON_INTERPRET=1), where a batching engine also decodes
through the kernel, each request as it decodes alone."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
import torch

from paradec.models.layers import RotaryEmbedding
from paradec.ops import rope_kv as rk

from interpreted import run_interpreted
from tiny import tiny_checkpoint

HERE = Path(__file__).parent
needs_triton = pytest.mark.skipif(not rk.HAVE_TRITON, reason="needs triton")


def _inputs(device, dtype, seed, heads, kv_heads, d, b, t, rows_per_call):
    g = torch.Generator().manual_seed(seed)
    n = heads + 2 * kv_heads
    wide = torch.randn(b, t, n + 3, d, generator=g).to(device=device, dtype=dtype)  # a strided view, as a projection's
    qkv = wide[:, :, 1:n + 1]
    positions = torch.randint(0, 4000, (b, t), generator=g).to(device)
    cos, sin = RotaryEmbedding(d, 10000.0).to(device)(positions)
    r, s = b + 2, t + 5
    keys = torch.randn(r, kv_heads, s + 1, d, generator=g).to(device=device, dtype=dtype)
    values = torch.randn(r, s + 1, kv_heads, d, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    if rows_per_call == "own":  # each call column's row is its batch row, as a step call's (rows None)
        rows = None
        slots = torch.stack([torch.randperm(s, generator=g)[:t] for _ in range(b)])
    else:  # any rows, as packed queries' (distinct row and slot pairs)
        pairs = torch.randperm(r * s, generator=g)[: b * t].view(b, t)
        rows, slots = (pairs // s).to(device), pairs % s
    return qkv, cos, sin, (keys, values), rows, slots.to(device)


def check_rope_kv(device: str, dtype: torch.dtype) -> None:
    """q, the pool's rows (written slots and untouched ones) equal the twin's: q and k within
    one rounding of the dtype (on a GPU the kernel may fuse a multiply-add; Triton's interpreter
    truncates fp32 to bf16 where a GPU rounds to nearest), v exactly. Keys and values of
    different layouts (slot-major values), views from slot 1."""
    tol = dict(rtol=0, atol=0) if dtype == torch.float32 and device == "cpu" else \
        {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}[dtype]
    cases = [(8, 8, 32, 2, 7, "own"), (28, 4, 128, 3, 5, "any"), (4, 2, 24, 1, 9, "own"), (6, 2, 16, 2, 1, "any")]
    for seed, (heads, kv_heads, d, b, t, rows_per_call) in enumerate(cases):
        qkv, cos, sin, (keys, values), rows, slots = _inputs(device, dtype, seed, heads, kv_heads, d, b, t,
                                                             rows_per_call)
        twin_keys, twin_values = keys.clone(), values.clone()
        got = rk.rope_kv(qkv, cos, sin, keys[:, :, 1:], values[:, :, 1:], rows, slots, heads, kv_heads)
        want = rk.rope_kv_twin(qkv, cos, sin, twin_keys[:, :, 1:], twin_values[:, :, 1:], rows, slots, heads,
                               kv_heads)
        assert got.shape == (b, heads, t, d) and got.is_contiguous()
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(keys, twin_keys, **tol)
        assert torch.equal(values, twin_values)  # v: copied, untouched slots as they were
        written = torch.zeros(keys.shape[0], keys.shape[2], dtype=torch.bool, device=device)
        own = torch.arange(b, device=device)[:, None].expand(b, t)
        written[own if rows is None else rows, slots + 1] = True
        assert written.sum() == b * t
        assert torch.equal(keys.transpose(1, 2)[~written], twin_keys.transpose(1, 2)[~written])
    with pytest.raises(ValueError, match="do not fit"):
        rk.rope_kv(qkv[:, :, 1:], cos, sin, keys, values, rows, slots, heads, kv_heads)
    with pytest.raises(ValueError, match="unit last stride"):
        rk.rope_kv(qkv, cos, sin, keys.transpose(2, 3).contiguous().transpose(2, 3), values, rows, slots, heads,
                   kv_heads)


def check_engine_decodes_as_alone(staggered: bool) -> None:
    """A batching engine whose rows' attention layers rotate and write k/v with the kernel:
    requests of mixed settings joining at different steps (``staggered``: packed calls), or two
    in lockstep (calls of two rows, each its own), get ``generate()``'s tokens (fp32)."""
    sys.path.insert(0, str(HERE))
    import paradec
    from test_batching import QUESTIONS, Run, make_engine, solo

    batches = []
    kernel = rk.rope_kv

    def counted(*args):
        batches.append((args[0].shape[0], args[5] is None))  # (B, a column's row its batch row)
        return kernel(*args)

    rk.rope_kv = counted
    # a two-layer random model, not paradec-tiny's six (Triton's interpreter: ~0.03 s a program)
    model = paradec.load(tiny_checkpoint(Path(tempfile.mkdtemp()), "llada", seed=5)[0], dtype=torch.float32)
    nap = dict(blocks=2, block_len=6, summary_len=4, window=3, tokens_per_step=3)
    settings = [dict(nap, cache="dual"), dict(mode="block", answer_len=8, block_len=4, tokens_per_step=2, cache="dual"),
                dict(nap, attention="canvas")]
    schedule = [(i, f"r{i}", QUESTIONS[i], settings[i]) for i in range(3)]
    schedule += [(0, f"lockstep{i}", QUESTIONS[3 + i], settings[0]) for i in range(2)]
    part = schedule[:3] if staggered else schedule[3:]
    run = Run(make_engine(model, max_batch=4), part)
    for _, rid, prompt, kwargs in part:
        assert run.results[rid].token_ids == solo(model, prompt, kwargs).token_ids, rid
    assert ((1, False) if staggered else (2, True)) in batches  # packed calls, or two rows stepping together


@needs_triton
def test_in_the_triton_interpreter():
    setup = "from paradec.ops import rope_kv; rope_kv.DEVICES.add('cpu'); import test_rope_kv as t"
    run_interpreted(setup, ["[t.check_rope_kv('cpu', d) for d in (torch.float32, torch.bfloat16)]",
                            "t.check_engine_decodes_as_alone(staggered=True)",
                            "t.check_engine_decodes_as_alone(staggered=False)"], env={"PARADEC_BATCH_INVARIANT": "0"})


def test_only_the_kernels_dtypes_route_to_it(monkeypatch):
    """float64 (which the fp32 rotation would round) keeps the compiled or eager path, as autograd
    and devices outside DEVICES do."""
    with torch.no_grad():
        assert not rk.usable(torch.zeros(2, 4))  # the CPU is not in DEVICES by default
        monkeypatch.setattr(rk, "DEVICES", {"cpu"})
        assert [rk.usable(torch.zeros(2, 4, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)] \
            == [rk.HAVE_TRITON] * 3
        assert not rk.usable(torch.zeros(2, 4, dtype=torch.float64))
    assert not rk.usable(torch.zeros(2, 4))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not rk.HAVE_TRITON, reason="needs CUDA and triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_against_the_twin(dtype):
    check_rope_kv("cuda", dtype)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not rk.HAVE_TRITON, reason="needs 2 GPUs and triton")
def test_cuda_on_a_second_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the kernel launches on their GPU and matches
    the twin there."""
    qkv, cos, sin, pool, rows, slots = _inputs("cuda:1", torch.bfloat16, 3, 8, 2, 64, 2, 5, "any")
    twin_pool = [x.clone() for x in pool]
    with torch.cuda.device(0):
        q = rk.rope_kv(qkv, cos, sin, pool[0], pool[1], rows, slots, 8, 2)
    want = rk.rope_kv_twin(qkv, cos, sin, twin_pool[0], twin_pool[1], rows, slots, 8, 2)
    assert q.device == qkv.device
    torch.testing.assert_close(q, want, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(pool[0], twin_pool[0], rtol=8e-3, atol=8e-3)
    assert torch.equal(pool[1], twin_pool[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or not rk.HAVE_TRITON, reason="needs CUDA and triton")
def test_cuda_rotation_equals_the_compiled_one():
    """The kernel's q and k against the layers' compiled rotation (``layers.rotate``), bit for
    bit where the two contract the same multiply-adds (reported), within one rounding always."""
    from paradec.models.layers import rotate

    qkv, cos, sin, pool, rows, slots = _inputs("cuda", torch.bfloat16, 0, 32, 32, 128, 4, 64, "own")
    q = rk.rope_kv(qkv, cos, sin, pool[0], pool[1], rows, slots, 32, 32)
    compiled = rotate(qkv[:, :, :64].transpose(1, 2), cos, sin)  # [B, 64, T, D]
    torch.testing.assert_close(q, compiled[:, :32], rtol=8e-3, atol=8e-3)
    print("rope_kv q bits equal the compiled rotation's:", torch.equal(q, compiled[:, :32]))
