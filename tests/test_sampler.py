"""The device sampler: a counter-based hash keyed by (seed, group, step, offset, salt)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from paradec.decoding import sampler

KEYS = st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 64), st.integers(0, 10**6), st.integers(0, 4096))


@settings(max_examples=50, deadline=None)
@given(rows=st.lists(KEYS, min_size=1, max_size=6), salt=st.sampled_from([sampler.TOKENS, sampler.ORDER]),
       width=st.integers(1, 40))
def test_uniform_equals_its_python_reference(rows, salt, width):
    """The int64 tensor arithmetic (wrapping products, logical shifts by masking) computes the
    same bits as exact 64-bit integer arithmetic."""
    parts = [torch.tensor(column, dtype=torch.long) for column in zip(*rows)]
    got = sampler.uniform(*parts, salt, width)
    assert got.dtype == torch.float64 and got.shape == (len(rows), width)
    for i, row in enumerate(rows):
        assert got[i].tolist() == sampler.uniform_reference(*row, salt, width)


def test_a_row_depends_on_its_own_key_only():
    """A row's numbers do not depend on which other rows are drawn with it, nor where it sits."""
    keys = torch.tensor([[3, 0, 5, 7], [3, 1, 5, 7], [4, 0, 5, 7], [3, 0, 6, 7], [3, 0, 5, 8]])
    together = sampler.uniform(*keys.T, sampler.TOKENS, 16)
    for i in range(len(keys)):
        alone = sampler.uniform(*keys[i : i + 1].T, sampler.TOKENS, 16)
        assert torch.equal(alone[0], together[i])
        reversed_rows = sampler.uniform(*keys.flip(0).T, sampler.TOKENS, 16)
        assert torch.equal(reversed_rows[len(keys) - 1 - i], together[i])
    # every key part and the salt change the numbers
    assert len({tuple(row.tolist()) for row in together}) == len(keys)
    assert not torch.equal(sampler.uniform(*keys.T, sampler.ORDER, 16), together)


def test_numbers_are_uniform_in_the_open_interval():
    n = 200_000
    keys = [torch.zeros(1, dtype=torch.long)] * 4
    u = sampler.uniform(*keys, sampler.TOKENS, n)[0]
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    chi2 = float(((counts - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < 50  # 19 degrees of freedom: p < 1e-4 above ~50
