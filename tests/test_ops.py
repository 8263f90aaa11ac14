"""Kernels against their plain-torch twins on fresh random inputs (CPU here; the same tests run
on CUDA when a GPU is there)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from paradec import ops

pytestmark = pytest.mark.skipif(not ops.NATIVE, reason=f"paradec._C not built: {ops.WHY}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and ops.native_on(torch.device("cuda")) else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(n, v, dtype, device, seed, temperature=0.0, spread=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n + 3, v, generator=g) * spread).to(dtype)
    rows = torch.randint(0, n + 3, (n,), generator=g)  # addressed rows, repeats allowed
    stops = torch.tensor([1, v - 1])
    bar = torch.rand(n, generator=g) < 0.5
    noise = torch.rand(n, v, generator=g, dtype=torch.float64).clamp_(min=1e-300) if temperature > 0 else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(logits), move(rows), 0, move(stops), move(bar), temperature, move(noise)


def _compare(args):
    native = torch.ops.paradec.score(*args)
    twin = ops.score_twin(*args)
    assert native[0].tolist() == twin.tokens.tolist()
    # fp32 accumulation in another order over up to 152k terms, and an exp within 2e-7 relative:
    # relative differences stay near 1e-6; 1e-4 leaves room while catching any wrong formula.
    for got, want in zip(native[1:], (twin.confidence, twin.margin, twin.neg_entropy)):
        torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, v", [(1, 5), (7, 1000), (64, 32000), (3, 152064)])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_score_matches_twin(device, dtype, n, v, temperature):
    for seed in range(2):
        _compare(_case(n, v, dtype, device, seed, temperature))


@pytest.mark.parametrize("device", DEVICES)
def test_score_many_rows(device):
    _compare(_case(4096, 512, torch.bfloat16, device, 5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset, width", [(0, 126464), (1, 126464), (0, 126461)])
def test_score_wide_rows_aligned_or_not(device, dtype, offset, width):
    """LLaDA-wide rows, enough of them that a GPU block's slice is as wide as it gets, with barred
    ids in the middle of slices. On Hopper, 2-byte rows at 16-byte-aligned addresses a multiple
    of 8 wide take bulk copies; a one-column offset takes the streamed scalar loads, and a width
    that is not a multiple of 8 the streamed 16-byte loads."""
    n, v = 80, width
    g = torch.Generator().manual_seed(11)
    wide = (torch.randn(n, 126464 + 8, generator=g) * 4).to(dtype)
    logits = wide[:, offset:offset + v]
    rows = torch.randperm(n, generator=g)
    stops = torch.tensor([7, 20000, 70001, v - 1])
    bar = torch.arange(n) % 2 == 0
    args = [logits, rows, 0, stops, bar, 0.0, None]
    _compare(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_score_rows_far_above_their_first_logits(device, dtype):
    """Rows whose running maximum keeps climbing far past the first logits a GPU thread saw
    (its softmax base moves only when a logit exceeds it by a wide margin), falling ones, and
    wide random spreads: scores equal the twin's."""
    v = 126464
    g = torch.Generator().manual_seed(3)
    logits = torch.stack([
        torch.linspace(-20, 600, v),  # climbing by ~0.005 a logit: the maximum is the last one
        torch.linspace(600, -20, v),  # falling
        torch.linspace(-60000, 60000, v),  # climbing by ~1 a logit, within fp16's range
        torch.randn(v, generator=g) * 100,
        torch.where(torch.rand(v, generator=g) < 0.5, -torch.inf, torch.randn(v, generator=g) * 50),
    ]).to(dtype)
    args = [logits, torch.arange(5), 0, torch.tensor([3]), torch.ones(5, dtype=torch.bool), 0.0, None]
    _compare(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("n", [1024, 4096])
def test_score_entropy_of_a_peaked_row_after_a_low_start(device, n):
    """A bf16 row whose first GPU thread starts far below the row's maximum and then sees the
    maximum and thousands of logits 16 below it, addressed often enough that a block reads the
    whole row: the negative entropy (about -1e-3) is a small difference of large sums, and a
    softmax base left far below the maximum loses it (found in review). GPU only: the CPU kernel
    does not split rows, and the twin over 4096 rows of 126,464 is heavy on a CPU."""
    v = 126464
    row = torch.full((v,), -100.0)
    starts = torch.arange(0, v, 2048)
    row[(starts[:, None] + torch.arange(8)).reshape(-1)] = -16.0
    row[1:8] = -44.0
    row[2048] = 0.0
    logits = row[None].to(torch.bfloat16)
    args = [logits, torch.zeros(n, dtype=torch.long), 0, torch.tensor([3]), torch.zeros(n, dtype=torch.bool), 0.0, None]
    _compare(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


def _whole_row_counts() -> list[int]:
    """Row counts that fill one or two waves of the CUDA kernel's 768-thread blocks (two per SM)
    at least 85%, so that greedy 2-byte rows get one block each on any GPU (csrc: whole_rows)."""
    if "cuda" not in DEVICES:
        return []
    slots = 2 * torch.cuda.get_device_properties(0).multi_processor_count
    return [slots, slots * 9 // 10, 2 * slots - 8]


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", _whole_row_counts())
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_score_rows_one_block_each(device, dtype, n, temperature):
    """Enough LLaDA-wide rows that they fill one or two waves of the GPU's largest blocks, one
    block a row for greedy 2-byte rows: each block merges, resolves and writes its row's scores
    itself, with no second kernel. Planted among random rows: one all -inf, one with two +inf in
    different warps' chunks, one with a single +inf in its last chunk, one whose only finite
    logits are barred, one whose maximum is tied in chunks of different warps. GPU only: the twin
    over hundreds of wide rows is heavy on a CPU."""
    logits, rows, mask_id, stops, bar, temperature, noise = _case(n, 126464, dtype, "cpu", n, temperature)
    v = logits.shape[1]
    logits[0] = -torch.inf
    logits[1, [5000, 90000]] = torch.inf
    logits[2, v - 3] = torch.inf
    logits[3] = -torch.inf
    logits[3, [0, 1, v - 1]] = 5.0  # the mask id and both stop ids: barred where the row bars stops
    logits[4, [300, 64000, 120000]] = 40.0  # tied: 300 wins, margin 0
    rows[:5] = torch.arange(5)
    bar[:5] = True
    args = (logits, rows, mask_id, stops, bar, temperature, noise)
    _compare(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("offset, width", [(1, 126464), (0, 126461)])
def test_score_rows_one_block_each_unaligned(device, dtype, offset, width):
    """Rows one block each (as above) that the 16-byte chunk loop cannot take: a one-column
    offset, or a width that is not a multiple of 8. The large block folds them element by element,
    with barred ids in the rows."""
    n = _whole_row_counts()[0]
    g = torch.Generator().manual_seed(offset + width)
    wide = (torch.randn(n, 126464 + 8, generator=g) * 4).to(dtype)
    logits = wide[:, offset:offset + width]
    rows = torch.randperm(n, generator=g)
    stops = torch.tensor([7, 20000, width - 1])
    bar = torch.arange(n) % 2 == 0
    args = [logits, rows, 0, stops, bar, 0.0, None]
    _compare(tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [4, 256, *_whole_row_counts()[-1:]])
def test_score_greedy_top2_across_slices_and_chunks(device, dtype, n):
    """Five LLaDA-wide 2-byte rows, addressed n times in turn (a GPU splits them into few or many slices):
    the maximum tied across slices, barred ids holding the maximum next to the allowed one in
    the same 16-byte chunk, the second best inside the best chunk or in another slice, and the
    maximum in the row's last chunk. Greedy GPU rows resolve their best chunk once per row at the
    end; the lowest index holding the maximum and the true second best must come out."""
    v = 126464
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(5, v, generator=g) * 2
    logits[0, [70000, 100, 126000]] = 50.0  # tied across slices: 100 wins, margin 0
    logits[1, 0] = 60.0  # the mask id: barred
    logits[1, 20000] = 60.0  # a stop id, barred on this row, in the chunk of 20001
    logits[1, [20001, 90000]] = 50.0  # tied: 20001 wins
    logits[2, 33333], logits[2, 33334] = 50.0, 49.0  # second best in the best chunk
    logits[3, 33333], logits[3, 100001] = 50.0, 49.5  # second best in another slice
    logits[4, v - 1], logits[4, v - 3] = 50.0, 48.0  # the last chunk
    logits = logits.to(dtype)
    rows = torch.arange(n) % 5
    stops = torch.tensor([20000, 3])
    bar = rows == 1
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in (logits, rows, 0, stops, bar, 0.0, None)]
    _compare(tuple(args))
    tokens, _, margin, _ = torch.ops.paradec.score(*args)
    assert tokens.tolist() == torch.tensor([100, 20001, 33333, 33333, v - 1])[rows].tolist()
    assert ((margin == 0).cpu() == (rows < 2)).all()  # tied rows 0 and 1 only


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_score_ties_equal_rows_and_infinities(device, dtype, temperature):
    v = 3000
    logits = torch.randn(6, v)
    logits[0, [5, 17, 2500]] = 50.0  # planted tie at the top: the lowest index wins
    logits[1] = 0.25  # all equal
    logits[2, :] = float("-inf")
    logits[2, [9, 400]] = 1.0  # only two finite entries
    logits[3, [100, 2000]] = float("inf")  # two +inf
    logits[4, 7] = float("inf")
    logits[4, 0] = float("inf")  # +inf on the barred mask id does not count
    logits[5, :] = float("-inf")  # nothing allowed
    logits = logits.to(dtype)  # the planted values are exact in bf16
    rows = torch.arange(6)
    noise = torch.rand(6, v, dtype=torch.float64) if temperature > 0 else None
    args = [logits, rows, 0, torch.tensor([9]), torch.tensor([False, False, True, False, False, False]),
            temperature, noise]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    _compare(tuple(args))
    tokens, conf, margin, _ = torch.ops.paradec.score(*args)
    if temperature == 0:
        assert tokens[0] == 5 and tokens[1] == 1  # id 0 is the mask id: barred
    assert tokens[2] == 400  # id 9 is a barred stop id on this row
    assert tokens[3] == 100 and conf[3] == 0.5 and margin[3] == 0.0
    assert tokens[4] == 7 and conf[4] == 1.0
    assert tokens[5] == -1 and conf[5] == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_score_counts_every_inf_across_a_long_row(device, temperature):
    """bf16 rows as long as LLaDA's vocabulary with three or four +inf logits, some far apart
    (a GPU thread reads them in different loads after it has seen two): confidence 1/n_inf and
    negative entropy -log(n_inf) count all of them."""
    v = 126464
    logits = torch.randn(4, v, generator=torch.Generator().manual_seed(0)) * 3
    logits[0, [8, 9, 2056]] = float("inf")
    logits[1, [8, 2056, 4104, 6152]] = float("inf")
    logits[2, :] = float("inf")
    logits[3, [5000, 90000, 126463]] = float("inf")
    logits = logits.bfloat16()
    noise = torch.rand(4, v, dtype=torch.float64) if temperature > 0 else None
    args = [logits, torch.arange(4), 0, torch.tensor([2]), torch.zeros(4, dtype=torch.bool), temperature, noise]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    _compare(tuple(args))
    tokens, conf, _, neg_entropy = torch.ops.paradec.score(*args)
    n_inf = torch.tensor([3, 4, v - 1, 3], dtype=torch.float32)  # row 2: every id but the mask id 0
    torch.testing.assert_close(conf.cpu(), 1 / n_inf, rtol=1e-6, atol=0)
    torch.testing.assert_close(neg_entropy.cpu(), -torch.log(n_inf), rtol=1e-6, atol=0)
    assert tokens.tolist() == [8, 8, 1, 5000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 255, 256, 700])
@pytest.mark.parametrize("rule, param", [(0, 0.0), (1, 0.6), (2, 1.5)])
def test_select_commit_matches_twin(device, n, rule, param):
    """Candidates of a few segments spread over two canvas rows, more of them than a GPU block
    ranks from one shared-memory tile, with tied scores (ties go to the lowest column)."""
    g = torch.Generator().manual_seed(n + rule)
    key = torch.randint(0, 5, (n,), generator=g)
    batch = key % 2
    column = torch.randperm(2 * n, generator=g)[:n]
    score = torch.randint(0, 8, (n,), generator=g).float() / 8  # many ties
    quota = torch.bincount(key, minlength=5).clamp(max=3)[key]
    floor = torch.ones(n, dtype=torch.long)
    outputs = []
    for impl in (torch.ops.paradec.select_commit, ops.select_commit_twin):
        canvas, trace = torch.zeros(2, 2 * n, dtype=torch.long), torch.full((2, 2 * n), -1)
        args = [canvas, trace, batch, column, key, score, score, quota, floor, torch.arange(n) + 10, rule, param, 4]
        args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
        committed = impl(*args)
        outputs.append((committed.cpu(), args[0].cpu(), args[1].cpu()))
    for got, want in zip(*outputs):
        assert torch.equal(got, want)
    assert outputs[0][0].any()


def test_opcheck():
    args = _case(5, 300, torch.bfloat16, "cpu", 1, 0.7)
    torch.library.opcheck(torch.ops.paradec.score.default, args)
    n = 6
    canvas, trace = torch.zeros(2, 8, dtype=torch.long), torch.full((2, 8), -1)
    select_args = (canvas, trace, torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([1, 2, 3, 4, 5, 6]),
                   torch.tensor([0, 0, 0, 1, 1, 1]), torch.rand(n), torch.rand(n), torch.full((n,), 2),
                   torch.ones(n, dtype=torch.long), torch.arange(n), 0, 0.0, 3)
    torch.library.opcheck(torch.ops.paradec.select_commit.default, select_args)


@pytest.mark.parametrize(
    "change, message",
    [
        ({0: torch.zeros(3, 10, dtype=torch.long)}, "logits must be float32, bfloat16 or float16"),
        ({0: torch.zeros(10)}, r"logits must be \[R, V\]"),
        ({0: torch.zeros(3, 0)}, r"logits must have V >= 1 columns, got \[3, 0\]"),
        ({1: torch.zeros(2)}, r"rows must be \[N\] int64"),
        ({1: torch.tensor([0, 7])}, r"rows\[1\] = 7 is outside \[0, 3\)"),
        ({4: torch.zeros(3, dtype=torch.bool)}, r"bar_stop must be \[N\] bool with N = rows.size\(0\) = 2"),
        ({5: 0.5}, "noise is required when temperature > 0"),
        ({5: -1.0}, "temperature must be >= 0"),
        ({2: 10}, r"mask_id must lie in \[0, V\) = \[0, 10\), got 10"),
        ({2: -1}, r"mask_id must lie in \[0, V\) = \[0, 10\), got -1"),
        ({3: torch.tensor([1, 12])}, r"stop_ids\[1\] = 12 is outside \[0, 10\)"),
    ],
)
def test_score_bad_input_names_the_argument(change, message):
    args = [torch.randn(3, 10), torch.tensor([0, 2]), 0, torch.tensor([1]), torch.zeros(2, dtype=torch.bool), 0.0, None]
    for index, value in change.items():
        args[index] = value
    with pytest.raises(RuntimeError, match=message):
        torch.ops.paradec.score(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_score_refuses_stop_ids_outside_the_vocabulary(device):
    """paradec.ops.score checks stop ids on every device (on CUDA outside graph capture, by one
    host sync), naming them; the CUDA kernel itself, unchecked during capture, bars nothing for
    them rather than a truncated id."""
    args = [torch.randn(3, 10), torch.tensor([0, 2]), 0, torch.tensor([1, 2**32 + 5]), torch.ones(2, dtype=torch.bool)]
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
    with pytest.raises((RuntimeError, ValueError), match="stop_ids"):
        ops.score(*args)


def test_select_quota_larger_than_segment_is_refused():
    canvas, trace = torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), -1)
    args = (canvas, trace, torch.zeros(2, dtype=torch.long), torch.tensor([0, 1]), torch.tensor([0, 0]), torch.rand(2),
            torch.rand(2), torch.tensor([3, 3]), torch.ones(2, dtype=torch.long), torch.tensor([5, 6]), 0, 0.0, 0)
    for impl, error in ((torch.ops.paradec.select_commit, RuntimeError), (ops.select_commit_twin, ValueError)):
        with pytest.raises(error, match="quota 3 of segment key 0 is larger than its 2 candidates"):
            impl(*args)


def test_ops_is_a_leaf():
    """paradec.ops (the dispatch, its twins, fake kernels, batch_invariant) imports nothing from
    paradec beyond paradec._C: not decoding, models, api nor config. A fresh interpreter imports
    it under a bare ``paradec`` package (paradec/__init__.py imports the whole library)."""
    package_dir = Path(ops.__file__).parents[1]
    code = (
        "import sys, types; package = types.ModuleType('paradec'); package.__path__ = [sys.argv[1]]; "
        "sys.modules['paradec'] = package; import paradec.ops, paradec.ops.batch_invariant; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('paradec.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code, str(package_dir)], capture_output=True, text=True,
                            check=True).stdout.split()
    assert "paradec.ops.selection" in loaded and "paradec.ops.batch_invariant" in loaded
    outside = [m for m in loaded if m != "paradec._C" and not m.startswith("paradec.ops")]
    assert not outside, f"paradec.ops imports {outside}"
