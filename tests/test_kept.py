"""Kept runners: a request of the same key (request parameters, runtime settings, shapes, role)
reuses the runner (and its CUDA graphs); any other request, or another role, gets its own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import paradec
from paradec.api import build_layout, encode_prompt, resolve_config
from paradec.decoding import kept, runner
from paradec.engine import Engine

from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=12)
    return paradec.load(root)


def _make(model, prompts, **settings):
    config = resolve_config(model, **settings)
    layout = build_layout(model, config)
    return config, layout, [encode_prompt(model, p, config, layout) for p in prompts]


def test_runners_without_graphs_are_never_kept(model):
    engine = Engine(model)
    config, layout, ids = _make(model, ["a b c"], blocks=2, block_len=4, summary_len=2)
    first = engine.kept.runner(config, layout, ids)
    assert not first.capture
    assert engine.kept.runner(config, layout, ids) is not first
    assert engine.kept.by_role == {}


def _pretend_graphs(monkeypatch):
    """CUDA graphs would apply (the runners never get to capture here: nothing runs)."""
    monkeypatch.setattr(kept, "captures", lambda config, device: True)


def test_same_key_reuses_other_keys_and_roles_do_not(model, monkeypatch):
    _pretend_graphs(monkeypatch)
    kept_runners = Engine(model).kept
    runner = kept_runners.runner
    config, layout, ids = _make(model, ["a b c", "d e f"], blocks=3, block_len=4, summary_len=2)
    first = runner(config, layout, ids, think_blocks=[0, 1], summary=False)
    _, _, other_ids = _make(model, ["c b a", "f e d"], blocks=3, block_len=4, summary_len=2)
    again = runner(config, layout, other_ids, think_blocks=[0, 1], summary=False)
    assert again is first
    assert again.state.prompt_ids.tolist() == [list(map(int, i)) for i in other_ids]  # reset in place

    summary = runner(config, layout, ids, think_blocks=[], summary=True)
    assert summary is not first  # the summary role has its own runner...
    assert runner(config, layout, ids, think_blocks=[0, 1], summary=False) is first  # ...and keeps it
    rank_timeout = dataclasses.replace(config, rank_timeout_s=5.0)  # a distributed setting: not the runner's
    assert runner(rank_timeout, layout, ids, think_blocks=[0, 1], summary=False) is first
    sampled_config, _, _ = _make(model, ["a b c"], blocks=3, block_len=4, summary_len=2, temperature=0.5)
    released = []
    monkeypatch.setattr(first, "release", lambda: released.append(True))
    assert runner(sampled_config, layout, ids, think_blocks=[0, 1], summary=False) is not first  # other parameters
    assert released == [True]  # the one it replaced gave its buffers back
    first = runner(config, layout, ids, think_blocks=[0, 1], summary=False)
    assert runner(config, layout, ids, think_blocks=[2], summary=False) is not first  # other blocks
    longer = runner(config, layout, [ids[0] + [5], ids[1]], think_blocks=[2], summary=False)
    assert longer.state.prompt_ids.shape[1] == len(ids[0]) + 1
    other_config, other_layout, _ = _make(model, ["a b c"], blocks=3, block_len=4, summary_len=2, seed=9)
    assert runner(other_config, other_layout, ids, think_blocks=[2], summary=False) is not longer
    windowed = dataclasses.replace(other_config, window=2)  # a runtime setting
    assert runner(windowed, other_layout, ids, think_blocks=[2], summary=False) is not longer


def test_the_key_names_what_fixes_a_runner(model):
    config, layout, ids = _make(model, ["a b c", "d e"], blocks=2, block_len=4, summary_len=2)
    key = kept.RunnerKey.of(model, config, layout, ids, [0], False, None)
    assert (key.request, key.runtime) == (config.request, config.runtime)
    assert (key.canvas_len, key.batch, key.prompt_len) == (layout.length, 2, max(map(len, ids)))
    assert key.think_blocks == (0,) and key.summary is False
    assert key == kept.RunnerKey.of(model, dataclasses.replace(config, gather="kv"), layout, ids, [0], False, None)


def test_release_kept_frees_every_role(model, monkeypatch):
    _pretend_graphs(monkeypatch)
    engine = Engine(model)
    config, layout, ids = _make(model, ["a b c"], blocks=2, block_len=4, summary_len=2)
    runners = [engine.kept.runner(config, layout, ids, think_blocks=[0, 1], summary=False),
               engine.kept.runner(config, layout, ids, think_blocks=[], summary=True)]
    released = []
    for r in runners:
        monkeypatch.setattr(r, "release", lambda r=r: released.append(r))
    engine.release_kept()
    assert released == runners and engine.kept.by_role == {}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_captures_once_and_each_request_equals_a_fresh_run(tmp_path, monkeypatch):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=13)
    model = paradec.load(root, device="cuda", dtype=torch.float32)
    captures = []
    original = runner.PhaseSteps.__init__

    def counting(self, *args, **kwargs):
        captures.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(runner.PhaseSteps, "__init__", counting)
    settings = dict(blocks=3, block_len=8, summary_len=4, tokens_per_step=2)
    requests = [["a b c", "d e"], ["c b a", "e d"], ["1 2 3", "4 5"]]
    assert {tuple(map(len, _make(model, r, **settings)[2])) for r in requests} == {(3, 2)}  # one shape
    outs = [paradec.generate(model, r, **settings) for r in requests]
    assert all("graphs" in out[0].timings for out in outs)
    assert len(captures) == 2  # the think and summary phases of the first request only
    for r, out in zip(requests, outs):
        fresh = paradec.generate(model, r, cuda_graphs=False, **settings)
        assert [x.token_ids for x in out] == [x.token_ids for x in fresh]
        assert [x.trace for x in out] == [x.trace for x in fresh]
