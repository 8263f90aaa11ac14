"""The model layer on a GPU: same function as on the CPU, and capturable in a CUDA graph."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import paradec
from paradec.models import AttentionSpec

from tiny import tiny_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _inputs(model, prompt_len, block_lens, summary_len, device, seed=0):
    spec = AttentionSpec.from_lengths("isolated", prompt_len, block_lens, summary_len)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, model.spec.vocab_size, (1, spec.total_len), generator=g).to(device)
    positions = torch.arange(spec.total_len, device=device)[None]
    return ids, positions, spec.segment_ids(positions[0])[None]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cuda_matches_cpu(tmp_path, family):
    root, _, _ = tiny_checkpoint(tmp_path, family, seed=1)
    cpu = paradec.load(root)
    gpu32 = paradec.load(root, device="cuda", dtype=torch.float32)
    gpu16 = paradec.load(root, device="cuda")
    assert gpu16.dtype == torch.bfloat16
    ids, positions, segments = _inputs(cpu, 6, [5, 5], 3, "cpu")
    ref = cpu(ids, positions, segments, "isolated").double()
    got32 = gpu32(ids.cuda(), positions.cuda(), segments.cuda(), "isolated").cpu().double()
    got16 = gpu16(ids.cuda(), positions.cuda(), segments.cuda(), "isolated").cpu().double()
    # fp32 on the GPU may use other kernels (and TF32 where enabled): ~1e-3 relative at most.
    assert ((got32 - ref).norm() / ref.norm()).item() < 2e-3
    # bf16: 8 mantissa bits, ~1e-2 through the stack.
    assert ((got16 - ref).norm() / ref.norm()).item() < 3e-2


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_unmasked_bf16_forward_matches_float64(tmp_path, family):
    """``dense=True`` in bf16 takes the unmasked flash kernels: as close to the CPU float64
    forward as the masked bf16 forward is, over a cached prompt under ``canvas`` attention."""
    root, _, _ = tiny_checkpoint(tmp_path, family, seed=3)
    cpu, gpu = paradec.load(root, dtype=torch.float64), paradec.load(root, device="cuda")
    spec = AttentionSpec.from_lengths("canvas", 9, [6, 6], 4)
    positions = torch.arange(spec.total_len)[None]
    segments = spec.segment_ids(positions[0])[None]
    ids = torch.randint(5, cpu.spec.vocab_size, positions.shape, generator=torch.Generator().manual_seed(4))
    canvas = (ids[:, 9:], positions[:, 9:], segments[:, 9:], "canvas")
    ref = cpu(*canvas, cache=cpu.prefill(ids[:, :9], torch.tensor([9])))
    cache = gpu.prefill(ids[:, :9].cuda(), torch.tensor([9], device="cuda"), reserve=16)
    args = tuple(x.cuda() for x in canvas[:3]) + ("canvas",)
    errors = {}
    for dense in (False, True):
        got = gpu(*args, cache=cache, dense=dense, check_inputs=not dense).cpu().double()
        errors[dense] = ((got - ref).norm() / ref.norm()).item()
    assert errors[True] < 3e-2 and errors[True] < 2 * errors[False] + 1e-3, errors


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_cached_forward_in_a_cuda_graph(tmp_path, family):
    root, _, _ = tiny_checkpoint(tmp_path, family, seed=2)
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    prompt_len = 7
    ids, positions, segments = _inputs(model, prompt_len, [6, 6], 0, "cuda")
    cache = model.prefill(ids[:, :prompt_len], torch.tensor([prompt_len], device="cuda"))
    canvas, pos, seg = ids[:, prompt_len:].clone(), positions[:, prompt_len:], segments[:, prompt_len:]
    uncached = model(ids, positions, segments, "isolated")[:, prompt_len:]

    def step():
        return model(canvas, pos, seg, "isolated", cache=cache, logits_at=pos, check_inputs=False)

    eager = step()
    torch.testing.assert_close(eager, uncached, rtol=2e-3, atol=2e-3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    canvas.copy_(torch.randint(5, model.spec.vocab_size, canvas.shape, device="cuda"))  # new inputs
    graph.replay()
    torch.testing.assert_close(out, step(), rtol=0, atol=0)


def test_random_model_built_on_the_gpu_runs_there(tmp_path):
    from paradec.models import build

    from tiny import llada_config, write_tokenizer

    config = llada_config(write_tokenizer(tmp_path))
    model = build(config, device="cuda", dtype=torch.bfloat16)
    assert all(t.is_cuda for t in list(model.module.parameters()) + list(model.module.buffers()))
    ids, positions, segments = _inputs(model, 5, [4], 0, "cuda")
    assert model(ids, positions, segments, "isolated").isfinite().all()


def test_generate_on_cuda_matches_cpu(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=9)
    cpu = paradec.load(root)
    gpu = paradec.load(root, device="cuda", dtype=torch.float32)
    config = paradec.GenerationConfig(blocks=3, block_len=8, summary_len=4, tokens_per_step=2)
    a = paradec.generate(cpu, ["a b c", "1 2 3 4 5"], config)
    b = paradec.generate(gpu, ["a b c", "1 2 3 4 5"], config)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids and x.trace == y.trace


GRAPH_CASES = {
    "block dual": dict(mode="block", answer_len=24, block_len=8, tokens_per_step=2, attention="canvas"),
    "block prefix": dict(mode="block", answer_len=24, block_len=8, tokens_per_step=2, cache="prefix"),
    "block threshold": dict(mode="block", answer_len=24, block_len=8, policy="threshold", threshold=0.9),
    "nap windowed": dict(blocks=3, block_len=12, summary_len=8, window=4, tokens_per_step=1, refresh_every=3),
    "nap exact": dict(blocks=3, block_len=10, summary_len=6, tokens_per_step=2),
    "nap budget": dict(blocks=2, block_len=10, summary_len=6, steps=9, policy="factor"),
    "ao": dict(mode="ao", answer_len=16, steps=8),
    "nap windowed none": dict(blocks=2, block_len=12, summary_len=8, window=4, cache="none", tokens_per_step=1),
    "nap partial refresh": dict(blocks=3, block_len=12, summary_len=8, window=4, tokens_per_step=1, refresh_every=3,
                                partial_refresh=True),
    "nap default refresh": dict(blocks=3, block_len=12, summary_len=8, window=4, tokens_per_step=2),
    "block partial refresh": dict(mode="block", answer_len=24, block_len=8, tokens_per_step=2, attention="canvas",
                                  partial_refresh=True),
    "block isolated": dict(mode="block", answer_len=20, block_len=6, tokens_per_step=2, attention="isolated"),
    "nap sampled": dict(blocks=3, block_len=10, summary_len=6, tokens_per_step=2, temperature=0.9, seed=3),
    "block sampled top_p": dict(mode="block", answer_len=16, block_len=8, tokens_per_step=2, temperature=1.2,
                                top_p=0.8, seed=4),
    "ao rank temperature": dict(mode="ao", answer_len=12, steps=6, temperature=0.7, rank_temperature=0.5, seed=5),
    "random order": dict(mode="random", answer_len=12, tokens_per_step=3, seed=6),
    "canvas uncached": dict(blocks=2, block_len=8, summary_len=4, tokens_per_step=2, attention="canvas"),
}


@pytest.mark.parametrize("case", list(GRAPH_CASES))
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_graph_replayed_steps_equal_eager_steps(tmp_path, family, case):
    """Replayed as CUDA graphs or called, the step body gives the same tokens, trace and steps
    (fp32), sampled steps included (their numbers are drawn on the device)."""
    root, _, _ = tiny_checkpoint(tmp_path, family, seed=5)
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    prompts = ["the 3 + 4 is ?", "a b c d e f g h i j k l"]
    graphed = paradec.generate(model, prompts, cuda_graphs=True, **GRAPH_CASES[case])
    eager = paradec.generate(model, prompts, cuda_graphs=False, **GRAPH_CASES[case])
    assert "graphs" in graphed[0].timings and "graphs" not in eager[0].timings
    assert [r.token_ids for r in graphed] == [r.token_ids for r in eager]
    assert [r.trace for r in graphed] == [r.trace for r in eager]
    assert [r.steps for r in graphed] == [r.steps for r in eager]


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_one_request_steps_attend_unmasked_and_equal_eager(tmp_path, family):
    """One request under ``canvas`` attention, nothing padded: every query sees every key, so the
    graphed steps and refreshes attend with no mask; they still equal the called steps.
    Two requests of different prompt lengths pad the keys, so theirs keep the mask."""
    from paradec.api import build_layout
    from paradec.decoding.runner import Runner

    root, _, _ = tiny_checkpoint(tmp_path, family, seed=5)
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    config = paradec.GenerationConfig(mode="block", answer_len=24, block_len=8, tokens_per_step=2,
                                      attention="canvas", eos_closes_block=False)
    layout = build_layout(model, config)
    for prompts, dense in (([[11, 12, 13, 14, 15, 16, 17, 18]], True), ([[11, 12, 13], [21, 22, 23, 24, 25]], False)):
        graphed = Runner(model, config, layout, prompts)
        out = graphed.run()
        steps = graphed.steps[tuple(graphed.phases[0])]
        assert (steps.step_dense, steps.refresh_dense) == (dense, dense)
        assert set(steps.step_graphs) == set(steps.refresh_graphs) == {dense}
        eager = Runner(model, dataclasses.replace(config, cuda_graphs=False), layout, prompts).run()
        assert torch.equal(out.canvas, eager.canvas) and torch.equal(out.trace, eager.trace)
        graphed.release()


def test_the_sampler_draws_the_same_bits_on_the_gpu():
    """The counter-based hash runs as int64 tensor arithmetic: the GPU wraps and shifts as the CPU
    does, so a sampled request decodes the same on either."""
    from paradec.decoding import sampler

    g = torch.Generator().manual_seed(0)
    parts = [torch.randint(0, 2**62, (64,), generator=g) for _ in range(2)] + [torch.randint(0, 4096, (64,), generator=g)
                                                                               for _ in range(2)]
    cpu = sampler.uniform(*parts, sampler.TOKENS, 1000)
    gpu = sampler.uniform(*(p.cuda() for p in parts), sampler.TOKENS, 1000)
    assert torch.equal(cpu, gpu.cpu())


def test_fused_functions_past_the_compile_limit_run_eager():
    """A process that meets more kinds of input than dynamo compiles a function for (here a
    limit of 1: fp32, then bf16, then fp32 under grad) runs the new kinds eager with one
    warning instead of failing (fullgraph), and the kinds compiled before still run compiled."""
    from paradec.models import layers

    def rotation(x, cos, sin):  # a fresh code object: dynamo's count starts at 0
        return layers.apply_rotary(x, cos, sin)

    rotate = layers.fused(rotation)
    x = torch.randn(2, 4, 8, 16, device="cuda")
    cos, sin = torch.randn(2, 1, 8, 16, device="cuda"), torch.randn(2, 1, 8, 16, device="cuda")
    with torch._dynamo.config.patch(recompile_limit=1), torch.no_grad():
        torch.testing.assert_close(rotate(x, cos, sin), layers.apply_rotary(x, cos, sin))  # compiled
        with pytest.warns(RuntimeWarning, match="recompile limit reached for rotation"):
            eager = rotate(x.bfloat16(), cos, sin)
        assert torch.equal(eager, layers.apply_rotary(x.bfloat16(), cos, sin))
        assert torch.equal(rotate(x[:1].bfloat16(), cos[:1], sin[:1]), layers.apply_rotary(x[:1].bfloat16(),
                                                                                            cos[:1], sin[:1]))
        torch.testing.assert_close(rotate(2 * x, cos, sin), layers.apply_rotary(2 * x, cos, sin))
        compiled = layers._kind(rotation, (x, cos, sin))
        assert layers._kind(rotation, (x.bfloat16(), cos, sin)) in layers._eager
    with torch._dynamo.config.patch(recompile_limit=1), torch.enable_grad():
        grad = x.clone().requires_grad_()
        assert torch.equal(rotate(grad, cos, sin), layers.apply_rotary(grad, cos, sin))
        assert layers._kind(rotation, (grad, cos, sin)) in layers._eager
    assert compiled not in layers._eager
