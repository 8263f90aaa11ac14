"""paradec.train.objective: LLaDA's masked-diffusion SFT loss. What is masked (never the prompt or
padding; headers only without structure awareness), what the logits function is handed, and the
loss against a hand computation, through a spy logits function."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.models.attention import PAD
from paradec.train.data import curate, pack
from paradec.train.objective import NoiseDraw, masked_diffusion_loss

from train.common import FMT, reasoning_examples



class Spy:
    """A logits_fn that records what it is given and returns a fixed random linear map of the
    noisy ids (logits = W[noisy]) at the target positions."""

    def __init__(self, vocab: int):
        self.weight = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        self.calls = []

    def __call__(self, noisy, positions, segments, attention, targets):
        self.calls.append(dict(noisy=noisy.clone(), positions=positions.clone(), segments=segments.clone(),
                               attention=attention, targets=targets.clone()))
        return self.weight[noisy][targets].float()


@pytest.fixture(scope="module")
def batch(tok):
    instances, _ = curate(tok, reasoning_examples(3, seed=7), FMT, "nap", tok.eos_token_id, tok.mask_token_id)
    return {k: v.long() for k, v in pack(instances, tok.pad_token_id).items()}


def _loss(batch, tok, noise, structure_aware):
    spy = Spy(len(tok))
    loss = masked_diffusion_loss(spy, batch["ids"], batch["segments"], batch["roles"], noise, tok.mask_token_id,
                                 "isolated", structure_aware)
    (call,) = spy.calls
    return loss, call, spy


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), structure_aware=st.booleans())
def test_the_prompt_and_padding_are_never_masked(batch, tok, seed, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    noise = NoiseDraw.draw(torch.Generator().manual_seed(seed), *ids.shape)
    _, call, _ = _loss(batch, tok, noise, structure_aware)
    noisy, mask = call["noisy"], tok.mask_token_id
    keep = (roles == 0) | (roles == -1) | ((roles == 1) if structure_aware else False)
    assert torch.equal(noisy[keep], ids[keep])
    may = (roles == 2) | ((roles == 1) if not structure_aware else False)
    assert torch.equal(call["targets"], may & (noise.u < noise.t[:, None]))
    assert torch.equal(noisy == mask, call["targets"])
    assert call["attention"] == "isolated" and torch.equal(call["segments"], batch["segments"])
    expected_positions = torch.where(batch["segments"] == PAD, -1, torch.arange(ids.shape[1]))
    assert torch.equal(call["positions"], expected_positions)


@pytest.mark.parametrize("structure_aware", [True, False])
def test_headers_are_masked_only_without_structure_awareness(batch, tok, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    everything = NoiseDraw(t=torch.ones(ids.shape[0]), u=torch.zeros(ids.shape))  # u < t everywhere
    _, call, _ = _loss(batch, tok, everything, structure_aware)
    masked = call["noisy"] == tok.mask_token_id
    assert masked[roles == 2].all()
    assert not masked[(roles == 0) | (roles == -1)].any()
    headers = masked[roles == 1]
    assert headers.numel() > 0
    assert (not headers.any()) if structure_aware else headers.all()


@pytest.mark.parametrize("structure_aware", [True, False])
def test_loss_equals_a_hand_computation(batch, tok, structure_aware):
    ids, roles = batch["ids"], batch["roles"]
    u = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1))
    noise = NoiseDraw(t=torch.tensor([0.25, 0.6, 0.9]), u=u)
    loss, _, spy = _loss(batch, tok, noise, structure_aware)
    rows = []
    for b in range(ids.shape[0]):
        response = (roles[b] == 2) | ((roles[b] == 1) & (not structure_aware))
        masked = response & (noise.u[b] < noise.t[b])
        assert masked.any()
        # Every masked position reads the mask id, so the spy's logits there are W[mask_id].
        log_p = torch.log_softmax(spy.weight[tok.mask_token_id].float().double(), dim=-1)
        ce = sum(-log_p[ids[b, p]] for p in masked.nonzero()[:, 0].tolist())
        rows.append(ce / float(noise.t[b]) / int(response.sum()))
    expected = torch.stack(rows).mean()
    # fp32 cross-entropy summed over ~100 positions against a float64 sum: ~1e-6 relative.
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
