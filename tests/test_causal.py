"""The AR baseline: static-cache greedy decoding equals a plain causal loop (tiny models, CPU)."""

from __future__ import annotations

import pytest
import torch

import paradec
from paradec.decoding.causal import StaticCausalDecoder
from paradec.errors import InputError

from tiny import tiny_checkpoint


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    return paradec.load(root)


def plain_causal_greedy(module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Every step forwards the whole sequence under a causal mask: no cache at all."""
    seq = prompt.clone()
    for _ in range(n):
        b, t = seq.shape
        positions = torch.arange(t).expand(b, t)
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t)
        hidden, _ = module.run_layers(module.embed(seq), positions, mask, None)
        seq = torch.cat((seq, module.lm_head(module.norm(hidden[:, -1])).argmax(-1, keepdim=True)), 1)
    return seq[:, prompt.shape[1]:]


def test_static_cache_decoding_equals_the_plain_loop(model):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(5, model.spec.vocab_size, (2, 9), generator=g)
    decoder = StaticCausalDecoder(model.module, batch=2, capacity=32)
    out = decoder.generate(prompt, 12)
    assert torch.equal(out.tokens, plain_causal_greedy(model.module, prompt, 12))
    assert out.timings["total"] >= out.timings["decode"] > 0
    # The buffers are reused: a second, shorter prompt decodes the same as a fresh decoder.
    again = decoder.generate(prompt[:, :5], 6)
    assert torch.equal(again.tokens, plain_causal_greedy(model.module, prompt[:, :5], 6))


def test_bad_requests_are_refused(model):
    decoder = StaticCausalDecoder(model.module, batch=1, capacity=16)
    with pytest.raises(InputError, match=r"max_new_tokens must lie in \[1, 6\]"):
        decoder.generate(torch.ones(1, 10, dtype=torch.long), 7)
    with pytest.raises(InputError, match=r"built for batch 1"):
        decoder.generate(torch.ones(2, 4, dtype=torch.long), 2)
    with pytest.raises(InputError, match=r"capacity 1000 exceeds the model's maximum length 256"):
        StaticCausalDecoder(model.module, batch=1, capacity=1000)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replayed_decoding_equals_eager(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=7)
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    prompt = torch.randint(5, model.spec.vocab_size, (2, 9), device="cuda")
    graphed = StaticCausalDecoder(model.module, 2, 40, graphs=True).generate(prompt, 20)
    eager = StaticCausalDecoder(model.module, 2, 40, graphs=False).generate(prompt, 20)
    assert torch.equal(graphed.tokens, eager.tokens)
    for n in (1, 2, 3):  # a request that fills the capacity exactly (the capture runs past it)
        tight = StaticCausalDecoder(model.module, 2, 9 + n, graphs=True).generate(prompt, n)
        assert torch.equal(tight.tokens, eager.tokens[:, :n])
    assert torch.equal(eager.tokens.cpu(), plain_causal_greedy(model.module.cpu(), prompt.cpu(), 20))
