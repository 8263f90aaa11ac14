"""paradec's kernels (``torch.ops.paradec.*`` from ``paradec._C``, built from ``csrc/``), their
plain-torch twins (``paradec.ops.scoring``, ``paradec.ops.selection``) and fake kernels
(``paradec.ops.fake``). Which one runs is chosen once, at import, and said in one log line; the
tests compare the two on fresh random inputs. ``paradec.ops.batch_invariant`` holds the model's
batch-invariant kernels. A leaf: nothing here imports from paradec beyond ``paradec._C``.

- ``score``: per masked row, the chosen token, its probability, the top-1 minus top-2
  probability and the negative entropy; rows are addressed by index (Dream's shift needs no
  copy); twin: ``paradec.ops.scoring.score_twin``. The kernel knows greedy choice and plain
  temperature sampling; a request with ``top_k`` / ``top_p`` or ``score_on="sampling"`` is
  scored by the twin on every device (``Sampling.plain``), so such a request's tokens never
  depend on which path ran. ``rank_temperature`` adds Gumbel noise to the ranking after either.
- ``select_commit``: per segment, commit by rule (top-k quota, threshold, factor, each with a
  floor), ties to the lowest position, writing tokens and step into the canvas and trace in
  place; twin: ``paradec.ops.selection.select_commit_twin``.
"""

from __future__ import annotations

import logging
import os

import torch

from paradec.ops import batch_invariant
from paradec.ops.scoring import Sampling, Scores, score_twin
from paradec.ops.selection import TOPK, check_quota, select_commit_twin

log = logging.getLogger("paradec")


def _load() -> tuple[bool, str]:
    if os.environ.get("PARADEC_DISABLE_KERNELS") == "1":
        return False, "PARADEC_DISABLE_KERNELS=1"
    try:
        import paradec._C  # noqa: F401 - registers torch.ops.paradec.*
    except ImportError as err:
        return False, f"paradec._C is not built ({err}); reinstall with `pip install --no-build-isolation -e .`"
    return True, "paradec._C loaded"


NATIVE, WHY = _load()
log.info("paradec ops: %s (%s)", "native kernels" if NATIVE else "plain-torch twins", WHY)

if NATIVE:
    from paradec.ops import fake  # noqa: F401 - registers the fake kernels of torch.ops.paradec.*


def native_on(device: torch.device) -> bool:
    """Whether the kernels serve tensors on ``device`` (CPU always when built; CUDA when the
    extension was built with CUDA)."""
    if not NATIVE:
        return False
    if device.type == "cpu":
        return True
    return torch._C._dispatch_has_kernel_for_dispatch_key("paradec::score", "CUDA")


def score(logits: torch.Tensor, rows: torch.Tensor, mask_id: int, stop_ids: torch.Tensor, bar_stop: torch.Tensor,
          temperature: float = 0.0, noise: torch.Tensor | None = None, sampling: Sampling | None = None,
          checked: bool = True) -> Scores:
    """logits: [R, V]; rows: [N] rows of ``logits`` to score; stop_ids: [S]; bar_stop: [N];
    noise: [N, V] float64 uniforms (temperature > 0). sampling: the request's filters and
    scores (the runner passes its config's; default: none). With ``rank_temperature`` the
    ranking noise is the Gumbel transform of each row's uniform at the mask id's column, which
    the token draw never reads (the mask id is barred): it is keyed like the draw (seed, group,
    step, position), so it does not depend on batching or placement either. In the
    batch-invariant mode (``batch_invariant.enabled()``) on a GPU a row's scores do not depend on
    the rows beside it: the kernel splits each row by V alone, and the twin (top-k/top-p,
    ``score_on='sampling'``) runs in calls of a fixed row count. checked=False skips the index
    check of rows and stop ids that a CUDA call outside a graph capture makes (a host sync)."""
    sampling = sampling or Sampling()
    if sampling.rank_temperature > 0 and noise is None:
        raise ValueError("rank_temperature > 0 draws its noise from the sampling stream: it needs temperature > 0")
    if sampling.plain and native_on(logits.device):
        if checked and logits.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            _check_indices(rows, logits.shape[0], stop_ids, logits.shape[1])  # the CUDA kernel cannot (no sync)
        tokens, confidence, margin, neg_entropy = torch.ops.paradec.score(
            logits, rows, mask_id, stop_ids, bar_stop, temperature, noise, batch_invariant.enabled()
        )
        scores = Scores(tokens, confidence, margin, neg_entropy)
    else:  # the kernel has no top-k/top-p filter nor sampling-distribution scores: the twin, on any device
        scores = score_twin(logits, rows, mask_id, stop_ids, bar_stop, temperature, noise, sampling)
    if sampling.rank_temperature > 0:
        scores.rank_noise = -torch.log(-torch.log(noise[:, mask_id]))
        scores.rank_temperature = sampling.rank_temperature
    return scores


def select_commit(canvas, trace, batch_index, column, key, score, confidence, quota, floor, tokens, rule: int,
                  param: float, step: int, checked: bool = True) -> torch.Tensor:
    """Commits in place; returns [N] bool, the candidates committed. checked=False skips the
    quota check that the CUDA kernel cannot make itself (a host sync), as ``score``'s does its
    index check: for callers that build their quotas and rows themselves (the batching engine)."""
    if native_on(canvas.device):
        if checked and canvas.device.type == "cuda" and not torch.cuda.is_current_stream_capturing() and rule == TOPK:
            check_quota(key, quota)  # the CUDA kernel cannot check without a host sync
        return torch.ops.paradec.select_commit(canvas, trace, batch_index, column, key, score, confidence, quota,
                                               floor, tokens, rule, param, step)
    return select_commit_twin(canvas, trace, batch_index, column, key, score, confidence, quota, floor, tokens,
                              rule, param, step)


def _check_indices(rows: torch.Tensor, num_rows: int, stop_ids: torch.Tensor, vocab: int) -> None:
    """rows in [0, num_rows) and stop ids in [0, vocab), read back with one host sync."""
    bounds = [(t.min(), t.max()) for t in (rows, stop_ids) if t.numel()]
    if not bounds:
        return
    values = torch.stack([x for pair in bounds for x in pair]).tolist()
    if rows.numel():
        low, high = values[:2]
        if low < 0 or high >= num_rows:
            raise ValueError(f"score: rows must lie in [0, {num_rows}), got [{low}, {high}]")
    if stop_ids.numel() and (values[-2] < 0 or values[-1] >= vocab):
        raise ValueError(f"score: stop_ids must lie in [0, {vocab}), got {stop_ids.tolist()}")
