"""Delayed KV inside a window (``delayed_kv``, ``paradec.decoding.delayed``): what a step forwards,
its static widths, and its twins (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paradec
from paradec import GenerationConfig
from paradec.api import resolve_config
from paradec.batching import BatchEngine
from paradec.decoding import delayed
from paradec.decoding.plan import Plan
from paradec.decoding.step import PhaseSteps
from paradec.errors import ConfigError

from test_decoding import check_contract_5
from tiny import tiny_checkpoint

PROMPTS = ["the 3 + 4 is ?", "a b c d e f g h i j k l"]
pytestmark = pytest.mark.filterwarnings("ignore:the header .* tokenises to the unknown token:UserWarning")
CASES = {  # the runner's paths: blocks side by side, one masked row (canvas attention), prefix cache, rules
    "side by side": dict(blocks=3, block_len=12, summary_len=6, window=6, tokens_per_step=1),
    "canvas attention": dict(blocks=2, block_len=12, summary_len=8, window=6, tokens_per_step=2, attention="canvas"),
    "prefix cache": dict(blocks=2, block_len=10, summary_len=6, window=5, cache="prefix", tokens_per_step=1),
    "threshold": dict(blocks=2, block_len=12, summary_len=6, window=6, policy="threshold", threshold=0.4),
    "block mode": dict(mode="block", answer_len=16, block_len=8, cache="dual", tokens_per_step=1),
    "refresh every": dict(blocks=2, block_len=12, summary_len=6, window=6, tokens_per_step=1, refresh_every=3),
    "step budget": dict(blocks=2, block_len=12, summary_len=6, window=6, steps=14, schedule="linspace"),
}


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=11)
    return paradec.load(root)


def _recording(monkeypatch) -> list[dict]:
    """Every delayed-KV step the runner takes: the step counter, the phase and window, and the
    canvas columns each request forwarded ([B, ...] as ``delayed.compact`` chose them)."""
    steps, compact = [], delayed.compact
    original = PhaseSteps._delayed_step

    def step(self, width):
        steps.append(dict(step=int(self.state.step), phase=self.phase, window=self.window, plan=self.plan,
                          width=width))
        original(self, width)

    def chosen(values, keep, width, pad):
        out = compact(values, keep, width, pad)
        steps[-1]["columns"] = [sorted(set(row.reshape(-1).tolist())) for row in out]
        return out

    monkeypatch.setattr(PhaseSteps, "_delayed_step", step)
    monkeypatch.setattr(delayed, "compact", chosen)
    return steps


def _expected(plan: Plan, phase: list[int], window: int, step: int, trace: list[int]) -> set[int]:
    """What a delayed step at step counter ``step`` must forward, read off the finished trace: a
    step column committed at the previous step or later (masked before it); for a shifted model
    the predecessor of a window column still masked, and a column outside the phase's blocks."""
    columns = plan.step_columns(phase, window)
    in_window, in_blocks = set(plan.window_columns(phase, window)), set(plan.block_columns(phase))
    need = {c for c in columns if trace[c] >= step - 1}
    if plan.shifted:
        need |= {c for c in columns if c + 1 in in_window and trace[c + 1] >= step}
        need |= {c for c in columns if c not in in_blocks}
    return need


@pytest.mark.parametrize("case", list(CASES))
def test_a_delayed_step_forwards_exactly_what_can_change(model, case, monkeypatch):
    """Read off each request's finished trace, every delayed step forwarded its window's masked
    columns and those committed at the previous step (a shifted model's masked columns'
    predecessors too), nothing else; with windows of several steps some steps forward fewer
    than the window's step columns."""
    steps = _recording(monkeypatch)
    config = GenerationConfig.build(None, **CASES[case], delayed_kv=True)
    results = paradec.generate(model, PROMPTS, config)
    assert steps, "no delayed step ran"
    fewer = 0
    for record in steps:
        plan, phase, window = record["plan"], record["phase"], record["window"]
        for r, result in enumerate(results):
            got = set(record["columns"][r])
            assert got <= set(plan.step_columns(phase, window))
            need = _expected(plan, phase, window, record["step"], result.trace)
            for g in phase:  # (a group whose window is done may pad with any of its columns)
                own = set(plan.step_columns([g], window))
                if need & own:
                    assert got & own == need & own, (case, record["step"], r, g)
            fewer += len(got) < len(plan.step_columns(phase, window))
    assert fewer > 0


@pytest.mark.parametrize("case", ["side by side", "canvas attention", "threshold", "block mode"])
def test_forwarding_every_column_is_the_default_step(model, case, monkeypatch):
    """The delayed step's own path (per-row slots, packing, side-by-side blocks) made to forward
    every step column decodes as the default step does, token for token."""
    monkeypatch.setattr(delayed, "needed", lambda tokens, trace, step, mask_id, valid, *rest:
                        valid.expand_as(tokens))
    monkeypatch.setattr(Plan, "delayed_width", lambda self, groups, *rest: 10**6)  # (capped at the step columns)
    everything = paradec.generate(model, PROMPTS, **CASES[case], delayed_kv=True)
    monkeypatch.undo()
    default = paradec.generate(model, PROMPTS, **CASES[case])
    assert [r.token_ids for r in everything] == [r.token_ids for r in default]
    assert [r.trace for r in everything] == [r.trace for r in default]


@pytest.mark.parametrize("case", ["side by side", "canvas attention", "threshold"])
def test_the_static_width_pads_without_changing_anything(model, case, monkeypatch):
    """Padding a delayed step to its window's whole step width instead of the schedule's bound
    (``Plan.delayed_width``) changes no token; the bound is tighter than the window (but for a
    shifted model's predecessors at these small windows), and holds (a called step checks it:
    ``delayed.check_width``)."""
    bounded = paradec.generate(model, PROMPTS, **CASES[case], delayed_kv=True)
    widths = _recording(monkeypatch)
    monkeypatch.setattr(Plan, "delayed_width", lambda self, groups, *rest: 10**6)
    padded = paradec.generate(model, PROMPTS, **CASES[case], delayed_kv=True)
    assert [r.token_ids for r in padded] == [r.token_ids for r in bounded]
    assert [r.trace for r in padded] == [r.trace for r in bounded]
    monkeypatch.undo()
    steps = _recording(monkeypatch)
    paradec.generate(model, PROMPTS, **CASES[case], delayed_kv=True)
    tighter = min(s["width"] for s in steps), min(s["width"] for s in widths)
    assert tighter[0] <= tighter[1] if model.module.shift_logits else tighter[0] < tighter[1]


def test_a_bound_that_does_not_hold_is_an_error(model, monkeypatch):
    """A called step whose needed columns exceed its static width raises rather than drop one."""
    monkeypatch.setattr(Plan, "delayed_width", lambda self, groups, *rest: 1)
    with pytest.raises(RuntimeError, match="delayed_kv: a step needs .* columns but its static width is 1"):
        paradec.generate(model, PROMPTS[0], **CASES["side by side"], delayed_kv=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["nap", "nap", "block"]),
    block_len=st.integers(2, 12),
    window=st.integers(1, 8),
    cache=st.sampled_from(["prefix", "dual"]),
    budget=st.sampled_from([dict(tokens_per_step=1), dict(tokens_per_step=3), dict(steps=30),
                            dict(steps=12, schedule="linspace"), dict(policy="threshold", threshold=0.5),
                            dict(policy="factor", factor=0.8),
                            dict(policy="margin", tokens_per_step=2, temperature=0.9, seed=4)]),
    extra=st.sampled_from([{}, dict(refresh_every=2), dict(eos_closes_block=False), dict(attention="canvas")]),
)
def test_the_bound_holds_wherever_a_request_decodes(model, mode, block_len, window, cache, budget, extra):
    """Decoding any of these settings with delayed KV, no called step needs more columns than
    ``Plan.delayed_width`` gave it (``delayed.check_width`` raises otherwise: top-k quotas,
    budgets and floors, rule policies, EOS filling, periodic refreshes, the prefix cache, block
    mode, a shifted model's predecessors), and contract 5 holds."""
    canvas = (dict(blocks=2, block_len=block_len, summary_len=4, window=window) if mode == "nap"
              else dict(mode="block", answer_len=2 * block_len, block_len=block_len))
    try:
        config = GenerationConfig.build(None, **canvas, cache=cache, delayed_kv=True, **budget, **extra)
    except ConfigError:
        return  # a budget too small for these windows
    result = paradec.generate(model, PROMPTS[1], config)
    check_contract_5(model, config, result)


def test_delayed_kv_is_validated():
    for settings_, message in ((dict(delayed_kv=True), "delayed_kv applies to a windowed cache"),
                               (dict(window=4, cache="none", delayed_kv=True), "got cache='none'"),
                               (dict(window=4, delayed_kv="yes"), "delayed_kv must be a bool")):
        with pytest.raises(ConfigError, match=message):
            GenerationConfig.build(None, **settings_)
    from paradec.config import validate

    with pytest.raises(ConfigError, match="delayed_kv does not combine with Fast-dLLM's rules"):
        validate(GenerationConfig(window=4, delayed_kv=True), window_steps=2)


def test_the_engine_steps_delayed_rows_beside_others_as_alone(model):
    """In the batching engine a delayed-KV request forwards fewer step columns than the same
    request without it, and both, decoded together with others joining, get ``generate()``'s
    tokens and trace alone."""
    settings_ = [dict(CASES["side by side"], delayed_kv=True), CASES["side by side"],
                 dict(CASES["threshold"], delayed_kv=True), dict(CASES["block mode"], delayed_kv=True)]
    forwarded = []
    for chosen in ([0], [1]):
        engine = BatchEngine(model, max_batch=2, max_prompt_tokens=32, max_canvas_tokens=64)
        engine.generate([PROMPTS[0]], [resolve_config(model, **settings_[i]) for i in chosen])
        forwarded.append(engine.stats.forwarded["step"])
    assert forwarded[0] < forwarded[1]
    engine = BatchEngine(model, max_batch=3, max_prompt_tokens=32, max_canvas_tokens=64)
    prompts = [PROMPTS[i % 2] for i in range(len(settings_))]
    results, added = {}, 0
    while added < len(settings_) or engine.has_unfinished():
        if added < len(settings_):
            engine.add(f"r{added}", prompts[added], **settings_[added])
            added += 1
        results |= {out.request_id: out.result for out in engine.step() if out.finished}
    for i, kwargs in enumerate(settings_):
        alone = paradec.generate(model, prompts[i], **kwargs)
        assert (results[f"r{i}"].token_ids, results[f"r{i}"].trace) == (alone.token_ids, alone.trace), kwargs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_delayed_steps_replay_as_graphs_like_called_steps():
    """On a GPU each delayed step width replays a graph of its own and decodes as the called
    steps do (batch-invariant kernels: a graph and a call of one shape round alike)."""
    model = paradec.load("paradec-tiny", device="cuda")
    for kwargs in (dict(blocks=4, window=8, tokens_per_step=1), dict(blocks=2, window=16, tokens_per_step=2),
                   dict(blocks=4, window=8, policy="threshold", threshold=0.8)):
        kwargs |= dict(delayed_kv=True, batch_invariant=True)
        replayed = paradec.generate(model, PROMPTS, **kwargs)
        called = paradec.generate(model, PROMPTS, **kwargs, cuda_graphs=False)
        assert [r.token_ids for r in replayed] == [r.token_ids for r in called], kwargs
        assert [r.trace for r in replayed] == [r.trace for r in called], kwargs
