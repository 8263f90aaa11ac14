"""Placement never changes the answer (contract 3), and a failing rank never hangs the others.

Each test launches gloo processes on this CPU, wired as torchrun would wire them, and compares
token for token with the one-process run."""

from __future__ import annotations

import json

import pytest

import paradec
from paradec.distributed import Placement

from dist_worker import launch, run_expecting_errors, run_scenarios, run_with_fault
from tiny import tiny_checkpoint

PROMPTS = ["the 3 + 4 is ?", "a b c d e f g h i j k l m n o"]

SCENARIOS = [
    # m not divisible by N for N = 2 and 4; prompt KV recomputed; tokens gathered
    {"prompts": [PROMPTS[0]], "config": {"blocks": 5, "block_len": 6, "summary_len": 4, "tokens_per_step": 2,
                                          "seed": 1, "prompt_kv": "recompute", "gather": "tokens"}},
    # a batch of prompts of different lengths, sampled; prompt KV broadcast; KV gathered
    {"prompts": PROMPTS, "config": {"blocks": 3, "block_len": 5, "summary_len": 3, "temperature": 1.0,
                                     "seed": 2, "prompt_kv": "broadcast", "gather": "kv"}},
    # fewer blocks than ranks for N = 3 and 4; the cost model chooses; EOS fill on; steps budget
    {"prompts": [PROMPTS[1]], "config": {"blocks": 2, "block_len": 7, "summary_len": 3, "steps": 6,
                                          "temperature": 0.7, "seed": 3, "prompt_kv": "auto", "gather": "kv"}},
    # every rank gets the results
    {"prompts": PROMPTS, "config": {"blocks": 4, "block_len": 4, "summary_len": 2, "seed": 4,
                                     "prompt_kv": "broadcast", "results_on": "all"}},
    # windows with the dual cache: refreshed partially (nap's default), then in full; sampled
    {"prompts": PROMPTS, "config": {"blocks": 3, "block_len": 9, "summary_len": 4, "window": 3, "temperature": 0.7,
                                     "seed": 5, "gather": "kv"}},
    {"prompts": [PROMPTS[0]], "config": {"blocks": 3, "block_len": 8, "summary_len": 4, "window": 3,
                                          "partial_refresh": False, "seed": 6, "gather": "tokens"}},
    # delayed KV inside the windows (each rank's blocks side by side)
    {"prompts": PROMPTS, "config": {"blocks": 3, "block_len": 12, "summary_len": 4, "window": 6,
                                     "delayed_kv": True, "seed": 7, "gather": "tokens"}},
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=51)
    return str(root)


@pytest.fixture(scope="module")
def one_process(model_dir):
    model = paradec.load(model_dir)
    return [paradec.generate(model, s["prompts"], **s["config"]) for s in SCENARIOS]


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_spread_over_ranks_equals_one_process(model_dir, one_process, world_size, tmp_path):
    codes = launch(world_size, run_scenarios, (model_dir, SCENARIOS, str(tmp_path)))
    assert codes == [0] * world_size
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    for i, (scenario, expected) in enumerate(zip(SCENARIOS, one_process)):
        got = ranks[0][i]
        for g, e in zip(got, expected):
            assert g["token_ids"] == e.token_ids and g["trace"] == e.trace, (world_size, i)
            assert g["nfe"] == e.nfe and g["steps"] == e.steps
        placement = got[0]["placement"]
        m = scenario["config"]["blocks"]
        assert placement["blocks_of_rank"] == [list(b) for b in Placement.plan(m, world_size).blocks_of_rank]
        assert placement["idle_ranks"] == [r for r in range(world_size) if r >= m]
        timings = got[0]["rank_timings"]
        assert [t["rank"] for t in timings] == list(range(world_size))
        assert all(t["think"] >= 0 and t["gather"] >= 0 for t in timings) and "summary" in timings[0]
        how, kv = placement["prompt_kv"], scenario["config"].get("gather") == "kv"
        assert all(("broadcast" in t) == (how == "broadcast") and ("blocks_kv" in t) == kv for t in timings)
        phases = got[0]["timings"]
        assert set(phases) == {"prefill", "broadcast", "think", "blocks_kv", "gather", "summary", "total"}
        assert (phases["broadcast"] > 0) == (how == "broadcast") and (phases["blocks_kv"] > 0) == kv
        assert phases["total"] >= phases["think"] + phases["summary"]
        everywhere = scenario["config"].get("results_on") == "all"
        for r in range(1, world_size):
            assert (ranks[r][i] is not None) == everywhere
            if everywhere:
                assert [x["token_ids"] for x in ranks[r][i]] == [x["token_ids"] for x in got]


def test_a_shifted_model_with_a_headerless_summary_spreads_as_one_process(tmp_path):
    """A Dream-style checkpoint whose summary has no header predicts the summary's first token
    from the last think column's final state: gathered as tokens the summary rank recomputes it
    with the blocks' KV; gathered as KV the rank holding the last block sends it (here rank 2)."""
    root, _, _ = tiny_checkpoint(tmp_path / "dream", "dream", seed=11, paradec={"summary_header": ""})
    scenarios = [
        {"prompts": PROMPTS, "config": {"blocks": 3, "block_len": 6, "summary_len": 4, "seed": 8, "gather": "kv"}},
        {"prompts": [PROMPTS[0]], "config": {"blocks": 3, "block_len": 8, "summary_len": 4, "window": 3,
                                              "gather": "kv"}},
        {"prompts": PROMPTS, "config": {"blocks": 3, "block_len": 8, "summary_len": 4, "window": 4,
                                         "gather": "tokens"}},
    ]
    model = paradec.load(root)
    one_process = [paradec.generate(model, s["prompts"], **s["config"]) for s in scenarios]
    out = tmp_path / "out"
    out.mkdir()
    assert launch(3, run_scenarios, (str(root), scenarios, str(out))) == [0] * 3
    got = json.loads((out / "rank0.json").read_text())
    for i, expected in enumerate(one_process):
        assert [(g["token_ids"], g["trace"]) for g in got[i]] == [(e.token_ids, e.trace) for e in expected], i


def test_a_shifted_model_with_headerless_think_blocks_is_not_spread(tmp_path):
    """Without think headers a shifted model predicts block j's first token from block j - 1's
    last column, which another rank decodes: spreading is refused by name, one process is not."""
    from paradec.api import build_layout, resolve_config
    from paradec.config.validation import validate

    root, _, _ = tiny_checkpoint(tmp_path / "dream", "dream", seed=11, paradec={"think_header": ""})
    model = paradec.load(root)
    config = resolve_config(model, blocks=3, block_len=6, summary_len=4)
    layout = build_layout(model, config)
    with pytest.raises(paradec.ConfigError, match=r"think blocks \[2, 3\] have no header.*run one process"):
        validate(config, layout=layout, ranks=2, shifted=True)
    validate(config, layout=layout, ranks=1, shifted=True)
    validate(config, layout=layout, ranks=2, shifted=False)  # (LLaDA reads a position's own state)
    headed = paradec.load(tiny_checkpoint(tmp_path / "headed", "dream", seed=11, paradec={"summary_header": ""})[0])
    validate(config, layout=build_layout(headed, config), ranks=2, shifted=True)  # (the summary is rank 0's)
    out = tmp_path / "out"
    out.mkdir()
    scenarios = [{"prompts": "a b c", "config": dict(blocks=3, block_len=6, summary_len=4)}]
    assert launch(2, run_expecting_errors, (str(root), scenarios, str(out))) == [0, 0]
    for r in range(2):
        assert "ConfigError: think blocks [2, 3] have no header" in json.loads((out / f"rank{r}.json").read_text())[0]


def test_placement_plan():
    assert Placement.plan(5, 2).blocks_of_rank == ((0, 1, 2), (3, 4))
    assert Placement.plan(2, 4).blocks_of_rank == ((0,), (1,), (), ())
    assert Placement.plan(2, 4).idle_ranks == [2, 3]
    assert Placement.plan(8, 4).blocks_of_rank == ((0, 1), (2, 3), (4, 5), (6, 7))


def test_disagreeing_ranks_and_canvas_attention_are_refused(model_dir, tmp_path):
    scenarios = [
        {"prompts": "a b c", "prompts_rank1": "a b d", "config": {"blocks": 2, "block_len": 3, "summary_len": 2}},
        {"prompts": "a b c", "config": {"blocks": 2, "block_len": 3, "summary_len": 2, "attention": "canvas"}},
        {"prompts": "a b c", "config": {"blocks": 2, "block_len": 3, "summary_len": 2, "summary": "concurrent"}},
    ]
    codes = launch(2, run_expecting_errors, (model_dir, scenarios, str(tmp_path)))
    assert codes == [0, 0]
    for r in range(2):
        errors = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert "ranks [1] disagree with rank 0 on the prompts" in errors[0]
        assert "attention='canvas' cannot be spread over 2 ranks" in errors[1]
        assert "summary='concurrent' attends to every think block" in errors[2]


@pytest.mark.parametrize("fault", ["kill", "raise"])
def test_a_failing_rank_does_not_hang_the_others(model_dir, tmp_path, fault):
    timeout = 3.0
    config = {"blocks": 3, "block_len": 8, "summary_len": 2, "rank_timeout_s": timeout, "prompt_kv": "recompute"}
    codes = launch(3, run_with_fault, (model_dir, config, 1, fault, str(tmp_path)), timeout_s=60)
    assert None not in codes  # nobody hung
    for r in (0, 2):
        report = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert report["error"].startswith("RankFailure: rank 1 ")
        assert report["seconds"] < timeout + 10
        if fault == "raise":
            assert "rank 1 failed: ValueError: planted failure" in report["error"]
        else:
            assert "stopped responding" in report["error"]
    if fault == "raise":
        assert json.loads((tmp_path / "rank1.json").read_text())["error"] == "ValueError: planted failure"
    else:
        assert codes[1] == 9


@pytest.mark.parametrize("non_owner_per_token, expected", [(1e-5, "recompute"), (2e-5, "broadcast")])
def test_prompt_kv_cost_model(monkeypatch, non_owner_per_token, expected):
    """Broadcast = the owner's prefill + the transfer; recompute = the slowest rank's prefill.
    Identical ranks recompute; a rank twice as slow as the owner makes broadcasting cheaper."""
    import torch

    from paradec.distributed import prompt_kv
    from paradec.distributed.env import DistEnv

    rates = prompt_kv.Rates(link_bytes_per_s=1e9, prefill=[(0.01, 1e-5), (0.01, non_owner_per_token)])
    monkeypatch.setattr(prompt_kv, "kv_bytes_per_token", lambda model: 1000)
    env = DistEnv(rank=1, local_rank=1, world_size=2, device=torch.device("cpu"), backend="gloo")
    costs = prompt_kv.estimate(rates, object(), env, 2048)
    assert costs.broadcast_s == pytest.approx(0.01 + 1e-5 * 2048 + 2048 * 1000 / 1e9)
    assert costs.recompute_s == pytest.approx(0.01 + non_owner_per_token * 2048)
    assert costs.choice == expected
