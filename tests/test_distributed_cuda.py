"""Two GPUs under torchrun (NCCL): the spread canvas equals the one-GPU run token for token."""

from __future__ import annotations

import pytest
import torch

from test_example import EXAMPLE, _run
from tiny import tiny_checkpoint

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

ARGS = ["--prompt", "a b c d", "--blocks", "4", "--block-len", "8", "--summary-len", "4", "--tokens-per-step", "2",
        "--temperature", "0.8", "--seed", "3", "--dtype", "fp32"]


@pytest.mark.parametrize("prompt_kv, gather", [("broadcast", "kv"), ("recompute", "tokens"), ("auto", "kv")])
def test_two_gpus_equal_one(tmp_path, prompt_kv, gather):
    import sys

    root, _, _ = tiny_checkpoint(tmp_path / "model", "llada", seed=81)
    common = ["--model", str(root), *ARGS, "--prompt-kv", prompt_kv, "--gather", gather]
    spread = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   str(EXAMPLE), *common], tmp_path)
    single = _run([sys.executable, str(EXAMPLE), *common], tmp_path)
    assert "placement: 2 ranks, blocks per rank [[0, 1], [2, 3]]" in spread
    between = lambda text: text[text.index("--- think 1"):text.index("answer:")]  # noqa: E731
    assert between(spread) == between(single)
    arness = lambda text: [line for line in text.splitlines() if line.startswith("Global ARness")]  # noqa: E731
    assert arness(spread) == arness(single)  # the same decode order


def test_two_gpus_capture_once_and_equal_one(tmp_path):
    """Greedy steps replay as CUDA graphs on every rank: captured on the first request only
    (rank 0 captures its blocks and the summary, rank 1 its blocks), and every request equals
    the one-GPU run."""
    import json

    import paradec
    from dist_worker import launch, run_counting_captures

    root, _, _ = tiny_checkpoint(tmp_path / "model", "llada", seed=82)
    config = {"blocks": 4, "block_len": 8, "summary_len": 4, "tokens_per_step": 2, "prompt_kv": "broadcast",
              "gather": "kv"}
    requests = [["a b c d", "e f g h"], ["d c b a", "h g f e"], ["1 2 3 4", "5 6 7 8"]]
    codes = launch(2, run_counting_captures, (str(root), requests, config, str(tmp_path)), device="cuda")
    assert codes == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["captures"] for r in ranks] == [2, 1]
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    single = [[(r.token_ids, r.trace) for r in paradec.generate(model, p, **config)] for p in requests]
    assert [[list(map(list, pair)) for pair in out] for out in ranks[0]["tokens"]] == \
        [[list(map(list, pair)) for pair in out] for out in single]
