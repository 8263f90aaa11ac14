"""The model's ``training_logits`` (paradec.models), which the objective and the trainer call: equal
to the decoding forward, never position 0 for a shifted model, and under isolated attention a
block's logits independent of the other blocks. Tiny LLaDA and Dream checkpoints."""

from __future__ import annotations

import pytest
import torch

import paradec
from paradec.models import AttentionSpec

from tiny import tiny_checkpoint

# fp32 against fp32 through the same tiny layers, gathered before or after the final norm:
# differences are ~1e-6; 1e-4 (as in test_models.py) still catches a wrong shift, mask or row
# order, which moves logits by ~1e-1.
FP32 = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module", params=["llada", "dream"])
def tiny(request, tmp_path_factory):
    root, config, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=21)
    return paradec.load(root), config


def _canvas(config, seed=0, batch=2):
    spec = AttentionSpec.from_lengths("isolated", 5, [4, 3, 4], 3)
    positions = torch.arange(spec.total_len).expand(batch, -1)
    segments = spec.segment_ids(torch.arange(spec.total_len)).expand(batch, -1)
    ids = torch.randint(5, config["vocab_size"], (batch, spec.total_len), generator=torch.Generator().manual_seed(seed))
    return spec, ids, positions, segments


@pytest.mark.parametrize("mode", ["isolated", "canvas"])
def test_training_logits_equal_the_decoding_forward(tiny, mode):
    model, config = tiny
    spec, ids, positions, segments = _canvas(config)
    g = torch.Generator().manual_seed(3)
    # 6 targets per row, never position 0 (a shifted model cannot predict it).
    at = torch.stack([torch.randperm(spec.total_len - 1, generator=g)[:6].sort().values + 1 for _ in range(2)])
    targets = torch.zeros_like(ids, dtype=torch.bool).scatter_(1, at, True)
    trained = model.module.training_logits(ids, positions, segments, mode, targets)
    decoded = model(ids, positions, segments, mode, logits_at=at)
    assert trained.shape == (12, config["vocab_size"]) and trained.requires_grad
    torch.testing.assert_close(trained.detach(), decoded.reshape(12, -1), **FP32)


def test_a_shifted_model_is_not_trained_on_position_0(tiny):
    model, config = tiny
    _, ids, positions, segments = _canvas(config)
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, 0] = True
    if model.spec.shift_logits:
        with pytest.raises(paradec.InputError, match="position 0"):
            model.module.training_logits(ids, positions, segments, "isolated", targets)
    else:
        assert model.module.training_logits(ids, positions, segments, "isolated", targets).shape[0] == 1


def test_isolated_training_logits_of_a_block_ignore_other_blocks(tiny):
    model, config = tiny
    spec, ids, positions, segments = _canvas(config, batch=1)
    (b1, e1), (b2, e2) = spec.blocks[:2]
    changed = ids.clone()
    changed[0, b2:e2] = torch.randint(5, config["vocab_size"], (e2 - b2,), generator=torch.Generator().manual_seed(9))
    assert not torch.equal(changed, ids)
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[0, b1:e1] = True
    summary = torch.zeros_like(ids, dtype=torch.bool)
    summary[0, spec.summary[0] + 1 :] = True

    def logits(x, targets):
        return model.module.training_logits(x, positions[:1], segments[:1], "isolated", targets).detach()

    # Block 1 sees only the prompt and itself: its logits do not move (to rounding: the masked
    # keys' weights are exactly 0, so at most summation-order noise, ~1e-7).
    torch.testing.assert_close(logits(changed, first), logits(ids, first), rtol=1e-6, atol=1e-6)
    # ...while the summary, which sees every block, does.
    assert (logits(changed, summary) - logits(ids, summary)).abs().max() > 1e-3
