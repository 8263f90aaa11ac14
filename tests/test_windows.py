"""Windowed decoding: ``block`` mode (semi-autoregressive blocks) and ``nap`` with ``window``,
with and without the prefix/dual caches (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paradec
from paradec import GenerationConfig
from paradec.api import build_layout, encode_prompt
from paradec.decoding.schedule import group_schedule
from paradec.decoding.plan import make_plan
from paradec.models.attention import PAD, PROMPT

from test_decoding import check_contract_5
from tiny import tiny_checkpoint

PROMPTS = ["the 3 + 4 is ?", "a b c d e f g h i j k l"]


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=11)
    return paradec.load(root)


def check_windows(model, config: GenerationConfig, result) -> None:
    """Inside each group, every position of a window is committed before any of the next,
    except EOS filling (an EOS closes the rest of its region at once)."""
    layout = build_layout(model, config)
    trace, tokens = torch.tensor(result.trace), torch.tensor(result.token_ids)
    stops = torch.tensor(model.spec.stop_ids)
    for start, end in layout.bodies:
        windows = [(s, min(s + config.window_len, end)) for s in range(start, end, config.window_len)]
        for (s0, e0), (s1, e1) in zip(windows, windows[1:]):
            last = int(trace[s0:e0].max())
            decoded = ~torch.isin(tokens[s1:e1], stops) | (trace[s1:e1] > last)
            assert all(t > last for t in trace[s1:e1][decoded].tolist()), (windows, trace.tolist())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    answer_len=st.integers(1, 20),
    block_len=st.integers(1, 8),
    cache=st.sampled_from(["none", "prefix", "dual"]),
    attention=st.sampled_from(["isolated", "canvas"]),
    policy=st.sampled_from(["confidence", "margin", "threshold", "factor"]),
    tokens_per_step=st.sampled_from([None, 1, 3]),
    temperature=st.sampled_from([0.0, 0.8]),
    seed=st.integers(0, 100),
)
def test_block_mode_keeps_the_invariants(model, answer_len, block_len, cache, attention, policy, tokens_per_step,
                                         temperature, seed):
    if policy in ("threshold", "factor"):
        tokens_per_step = None
    config = GenerationConfig(mode="block", answer_len=answer_len, block_len=block_len, cache=cache,
                              attention=attention, policy=policy, tokens_per_step=tokens_per_step,
                              temperature=temperature, seed=seed)
    result = paradec.generate(model, PROMPTS[0], config)
    check_contract_5(model, config, result)
    check_windows(model, config, result)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.integers(1, 3),
    block_len=st.integers(2, 9),
    summary_len=st.integers(1, 6),
    window=st.integers(1, 5),
    cache=st.sampled_from(["none", "prefix", "dual"]),
    refresh_every=st.sampled_from([None, 2]),
    steps=st.sampled_from([None, 24]),
    partial=st.sampled_from([None, False, True]),
    delayed_kv=st.booleans(),
)
def test_windowed_nap_keeps_the_invariants(model, blocks, block_len, summary_len, window, cache, refresh_every, steps,
                                          partial, delayed_kv):
    if cache == "none":
        refresh_every, delayed_kv = None, False
    config = GenerationConfig(blocks=blocks, block_len=block_len, summary_len=summary_len, window=window,
                              cache=cache, refresh_every=refresh_every, steps=steps,
                              partial_refresh=partial if cache == "dual" else None, delayed_kv=delayed_kv)
    result = paradec.generate(model, PROMPTS[1], config)
    check_contract_5(model, config, result)
    check_windows(model, config, result)


def semi_ar_reference(model, prompt: str, answer_len: int, block_len: int, k: int) -> list[int]:
    """LLaDA's semi-autoregressive sampler, written plainly: every step forwards the prompt and
    the whole answer under full attention, and commits the k most confident masked positions
    of the current block (float64 probabilities, ties to the lowest position)."""
    config = GenerationConfig(mode="block", answer_len=answer_len, block_len=block_len, attention="canvas")
    layout = build_layout(model, config)
    prompt_ids = torch.tensor(encode_prompt(model, prompt, config, layout))
    p, mask_id = len(prompt_ids), model.spec.mask_id
    answer = torch.full((answer_len,), mask_id)
    for start in range(0, answer_len, block_len):
        end = min(start + block_len, answer_len)
        for quota in group_schedule(end - start, None, k, "uniform"):
            ids = torch.cat((prompt_ids, answer))[None]
            positions = torch.arange(len(ids[0]))[None]
            segments = torch.where(positions < p, PROMPT, 1)
            logits = model(ids, positions, segments, "canvas", logits_at=positions[:, p + start : p + end])[0]
            probs = torch.softmax(logits.double(), -1)
            probs[:, mask_id] = 0
            confidence, tokens = probs.max(-1)
            confidence[answer[start:end] != mask_id] = -1
            order = sorted(range(end - start), key=lambda i: (-float(confidence[i]), i))[:quota]
            for i in order:
                answer[start + i] = tokens[i]
    return answer.tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_uncached_block_mode_is_llada_semi_ar(model, k):
    result = paradec.generate(model, PROMPTS[0], mode="block", answer_len=14, block_len=5, tokens_per_step=k,
                              attention="canvas", cache="none", eos_closes_block=False)
    assert result.token_ids == semi_ar_reference(model, PROMPTS[0], 14, 5, k)


@pytest.mark.parametrize("attention", ["canvas", "isolated"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_step_per_block_makes_the_caches_exact(model, attention, cache):
    """Each block's first step forwards everything, so a block decoded in one step is exact."""
    settings = dict(mode="block", answer_len=18, block_len=6, tokens_per_step=6, attention=attention)
    exact = paradec.generate(model, PROMPTS, cache="none", **settings)
    cached = paradec.generate(model, PROMPTS, cache=cache, **settings)
    assert [r.token_ids for r in cached] == [r.token_ids for r in exact]


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_window_spanning_the_block_is_exact_nap(model, cache):
    settings = dict(blocks=3, block_len=10, summary_len=6, tokens_per_step=2)
    exact = paradec.generate(model, PROMPTS, **settings)
    windowed = paradec.generate(model, PROMPTS, window=10, cache=cache, **settings)
    assert [r.token_ids for r in windowed] == [r.token_ids for r in exact]
    assert [r.trace for r in windowed] == [r.trace for r in exact]


def _refresh_then_step(model, config, prompts, phase, window, done=0):
    """A window's refresh (what an unwindowed step forwards, keeping the KV of all but the step
    columns) and, right after it, a cached step over the window's step columns: both logits
    [B, N] at the window's positions, and the step columns. ``done``: canvas columns committed
    (random ids) before the window."""
    from paradec.decoding.runner import Runner

    layout = build_layout(model, config)
    state = Runner(model, config, layout, [encode_prompt(model, p, config, layout) for p in prompts]).state
    state.canvas[:, :done] = torch.randint(10, 40, (len(prompts), done))
    plan = make_plan(config, layout, model.module.shift_logits)
    logits_at = state.positions[:, plan.window_columns(phase, window)]  # [B, N]
    step_cols = torch.tensor(plan.step_columns(phase, window))
    cache = None
    if config.attention == "isolated":
        cache = model.prefill(state.prompt_ids, state.prompt_lens, reserve=layout.length)
        cols = torch.tensor(plan.block_columns(phase))
        ids, positions, segments = state.canvas[:, cols], state.positions[:, cols], state.segments[:, cols]
    else:  # canvas attention: the prompt, then the whole canvas
        p = state.prompt_ids.shape[1]
        prompt_pos = torch.arange(p).expand(len(prompts), p)
        real = prompt_pos < state.prompt_lens[:, None]
        ids = torch.cat((state.prompt_ids, state.canvas), 1)
        positions = torch.cat((torch.where(real, prompt_pos, -1), state.positions), 1)
        segments = torch.cat((torch.where(real, PROMPT, PAD), state.segments), 1)
        cols = torch.cat((torch.full((p,), -1), torch.arange(layout.length)))
    keep = ~torch.isin(cols, step_cols)
    refresh_logits, window_cache = model.module.forward_and_cache(
        ids, positions, segments, config.attention, cache, logits_at, keep, reserve=len(step_cols),
        lengths=state.prompt_lens)
    step_logits = model(state.canvas[:, step_cols], state.positions[:, step_cols], state.segments[:, step_cols],
                        config.attention, cache=window_cache, logits_at=logits_at)
    return refresh_logits, step_logits, step_cols


@pytest.mark.parametrize("attention", ["canvas", "isolated"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_cached_step_reproduces_the_refresh(model, attention, cache):
    """Right after a refresh nothing has changed, so a step over the cache must give the
    refresh's logits: the kept KV, its positions, the mask and the shift line up."""
    config = GenerationConfig(mode="block", answer_len=16, block_len=4, attention=attention, cache=cache,
                              temperature=0.0)
    model.module.float()
    refresh_logits, step_logits, _ = _refresh_then_step(model, config, PROMPTS, [0], 1, done=4)  # block 1 of 4
    # fp32, the same tokens attending to the same keys in another order: summation-order noise.
    torch.testing.assert_close(step_logits, refresh_logits, atol=1e-4, rtol=1e-4)


def test_a_window_commits_in_every_block_every_step(model):
    result = paradec.generate(model, PROMPTS[1], blocks=3, block_len=8, summary_len=4, window=4, tokens_per_step=2)
    layout = build_layout(model, GenerationConfig(blocks=3, block_len=8, summary_len=4))
    trace = torch.tensor(result.trace)
    steps = [set(trace[s:e].tolist()) for s, e in layout.bodies[:3]]
    assert steps[0] == steps[1] == steps[2] == {0, 1, 2, 3}


def test_eos_ends_the_region_across_windows(tmp_path):
    """An EOS committed in one window fills every later window with EOS at once."""
    import json
    from collections import Counter

    settings = dict(mode="block", answer_len=24, block_len=4, tokens_per_step=1)
    root, config, _ = tiny_checkpoint(tmp_path, "llada", seed=13)
    probe = paradec.generate(paradec.load(root), PROMPTS[0], eos_closes_block=False, **settings)
    favourite = Counter(probe.token_ids[:12]).most_common(1)[0][0]  # a token the first windows say
    (root / "config.json").write_text(json.dumps(config | {"eos_token_id": favourite}))
    model = paradec.load(root)
    result = paradec.generate(model, PROMPTS[0], **settings)
    first = result.token_ids.index(favourite)
    later_windows = result.token_ids[(first // 4 + 1) * 4 :]
    assert later_windows and set(later_windows) == {favourite}
    off = paradec.generate(model, PROMPTS[0], eos_closes_block=False, **settings)
    assert result.steps < off.steps == 24


STATIC_CASES = {
    "block dual": dict(mode="block", answer_len=20, block_len=6, tokens_per_step=2, attention="canvas"),
    "block prefix": dict(mode="block", answer_len=20, block_len=6, tokens_per_step=3, cache="prefix"),
    "block threshold": dict(mode="block", answer_len=16, block_len=8, policy="threshold", threshold=0.9,
                            attention="canvas"),
    "nap windowed": dict(blocks=3, block_len=10, summary_len=6, window=4, tokens_per_step=1, refresh_every=3),
    "nap windowed none": dict(blocks=2, block_len=9, summary_len=5, window=4, cache="none", tokens_per_step=2),
    "nap partial refresh": dict(blocks=3, block_len=10, summary_len=6, window=3, tokens_per_step=1, refresh_every=2,
                                partial_refresh=True),
    "nap default refresh": dict(blocks=3, block_len=10, summary_len=6, window=3, tokens_per_step=2),
    "nap full refresh": dict(blocks=3, block_len=10, summary_len=6, window=3, tokens_per_step=2,
                             partial_refresh=False),
    "block partial refresh": dict(mode="block", answer_len=20, block_len=6, tokens_per_step=2, attention="canvas",
                                  partial_refresh=True),
    "nap exact": dict(blocks=3, block_len=8, summary_len=5, tokens_per_step=2),
    "nap budget": dict(blocks=2, block_len=10, summary_len=6, steps=9, policy="factor"),
    "ao": dict(mode="ao", answer_len=12, steps=6),
    "ar order": dict(mode="ar_order", answer_len=10, tokens_per_step=3),
}


def _plain_steps(decode):
    """``decode()`` with the step body's fast paths off: no blocks side by side, every attention
    through its mask. What the fast paths must reproduce."""
    from paradec.decoding import step

    choose = step.PhaseSteps._choose_attention

    def masked(self):
        choose(self)
        self.step_dense = self.refresh_dense = self.partial_dense = False

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(step, "SIDE_BY_SIDE_MAX_KEYS", 0)
        patch.setattr(step.PhaseSteps, "_choose_attention", masked)
        return decode()


def _recording(monkeypatch) -> list:
    """Records each PhaseSteps built: (phase, per_block, whether its BlockCache has a bias)."""
    from paradec.decoding import step

    built = []
    build = step.PhaseSteps._build

    def recording_build(self, phase_cache):
        build(self, phase_cache)
        built.append((self.phase, self.per_block, self.per_block and self.blocks.bias is not None))

    monkeypatch.setattr(step.PhaseSteps, "_build", recording_build)
    return built


@pytest.mark.parametrize("case", list(STATIC_CASES))
def test_fast_paths_equal_the_plain_steps(model, case, monkeypatch):
    """Every case decodes the same with the step body's fast paths (unmasked attention where every
    key is seen, blocks side by side, BlockCache rows padded to other multiples) as with the
    plain masked steps: tokens, trace and step count."""
    from paradec.decoding import step

    settings = STATIC_CASES[case]
    plain = _plain_steps(lambda: paradec.generate(model, PROMPTS, **settings))
    monkeypatch.setattr(step, "KEY_ALIGN", 16)
    fast = paradec.generate(model, PROMPTS, **settings)
    assert "steps" in fast[0].timings
    assert [(r.token_ids, r.trace, r.steps) for r in fast] == [(r.token_ids, r.trace, r.steps) for r in plain]


@pytest.mark.parametrize("case", ["block dual", "block prefix", "block threshold", "nap windowed", "ao"])
@pytest.mark.parametrize("prompts", [PROMPTS[1:], PROMPTS], ids=["one request", "two padded"])
def test_steps_attend_unmasked_where_every_key_is_seen(model, case, prompts, monkeypatch):
    """Under ``canvas`` attention one request's steps and refreshes see every key, so they attend
    with no mask (``Model.forward(dense=True)``), windows of every width included; two prompts
    of different lengths pad the keys and keep it. The tokens equal the masked steps'."""
    from paradec.decoding import step

    settings = dict(STATIC_CASES[case], attention="canvas")
    plain = _plain_steps(lambda: paradec.generate(model, prompts, **settings))
    chosen, choose = [], step.PhaseSteps._choose_attention

    def recording_choose(self):
        choose(self)
        chosen.append((self.step_dense, self.refresh_dense if self.windowed else self.step_dense))

    monkeypatch.setattr(step.PhaseSteps, "_choose_attention", recording_choose)
    fast = paradec.generate(model, prompts, **settings)
    assert [(r.token_ids, r.trace, r.steps) for r in fast] == [(r.token_ids, r.trace, r.steps) for r in plain]
    one = len(prompts) == 1
    assert chosen and all(flags == (one, one) for flags in chosen)


@pytest.mark.parametrize("headerless", ["summary", "block 2", "block 2 on its own rank"])
def test_headerless_groups_decode_like_the_plain_steps(model, headerless, monkeypatch):
    """Without a header, a shifted model's first window reads the column before it from another
    group (the summary's from the last think block): the step forwards that column too, and its
    key is in the step's cache only then."""
    from paradec.decoding.runner import Runner

    if headerless == "summary":
        monkeypatch.setattr(model, "summary_header_ids", lambda: [])
    else:
        header = model.think_header_ids
        monkeypatch.setattr(model, "think_header_ids", lambda i: [] if i == 2 else header(i))
    config = GenerationConfig(blocks=2, block_len=8, summary_len=8, window=4, tokens_per_step=1)
    if headerless.endswith("rank"):  # what a rank holding think block 1 alone decodes
        layout = build_layout(model, config)
        prompts, part = [encode_prompt(model, PROMPTS[0], config, layout)], dict(think_blocks=[1], summary=False)
        plain = _plain_steps(lambda: Runner(model, config, layout, prompts, **part).run())
        fast = Runner(model, config, layout, prompts, **part).run()
        assert torch.equal(fast.canvas, plain.canvas) and torch.equal(fast.trace, plain.trace)
        return
    settings = {k: getattr(config, k) for k in ("blocks", "block_len", "summary_len", "window", "tokens_per_step")}
    plain = _plain_steps(lambda: paradec.generate(model, PROMPTS, **settings))
    fast = paradec.generate(model, PROMPTS, **settings)
    assert [(r.token_ids, r.trace) for r in fast] == [(r.token_ids, r.trace) for r in plain]


def test_a_reset_runner_decodes_like_a_new_one(model):
    from paradec.decoding.runner import Runner

    config = GenerationConfig(blocks=2, block_len=8, summary_len=4, window=4, tokens_per_step=2)
    layout = build_layout(model, config)
    first = [encode_prompt(model, p, config, layout) for p in PROMPTS]
    second = [first[1][:3], first[1]]  # as many prompts, the longest as long
    runner = Runner(model, config, layout, first)
    runner.run()
    runner.reset(second)
    again = runner.run()
    fresh = Runner(model, config, layout, second).run()
    assert torch.equal(again.canvas, fresh.canvas) and torch.equal(again.trace, fresh.trace)
    with pytest.raises(paradec.ConfigError, match=r"reset needs 2 prompts, the longest \d+ tokens"):
        runner.reset([first[0]])


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 300), lengths=st.lists(st.integers(1, 64), min_size=1, max_size=9))
def test_steps_are_shared_by_window_length(steps, lengths):
    from paradec.decoding.plan import split_steps

    if steps < len(lengths):
        steps = len(lengths)  # the config refuses fewer steps than windows
    shares = split_steps(steps, lengths)
    assert sum(shares) == min(steps, sum(lengths))
    assert all(1 <= s <= n for s, n in zip(shares, lengths))
    exact = [min(steps, sum(lengths)) * n / sum(lengths) for n in lengths]
    # Proportional up to rounding, unless a window's floor of 1 or cap of n forced a shift.
    if all(1 <= e <= n for e, n in zip(exact, lengths)):
        assert all(abs(s - e) < 1 + 1e-9 * steps or s in (1, n) for s, e, n in zip(shares, exact, lengths))


def test_a_short_last_window_does_not_waste_the_budget(model):
    result = paradec.generate(model, PROMPTS[0], mode="block", answer_len=40, block_len=32, steps=32,
                              eos_closes_block=False)
    assert result.steps == 32
    trace = torch.tensor(result.trace)
    assert len(set(trace[:32].tolist())) == 26 and len(set(trace[32:].tolist())) == 6  # 32 * 32/40, 32 * 8/40


@pytest.mark.parametrize("window", [4, 8])
def test_a_windowed_nap_step_caches_the_headers(model, window):
    """With several windows a cached step forwards the windows (and a shifted model's column
    before each), not the headers, whose KV is refreshed with the rest of the block; with one
    window spanning the body it forwards the headers too (that step is exact). Right after a
    refresh, the cached step gives the refresh's logits either way."""
    config = GenerationConfig(blocks=2, block_len=8, summary_len=4, window=window, cache="dual", temperature=0.0)
    layout = build_layout(model, config)
    model.module.float()
    refresh_logits, step_logits, step_cols = _refresh_then_step(model, config, PROMPTS, [0, 1], 0)
    columns = set(step_cols.tolist())
    for g in (0, 1):
        header = set(range(layout.blocks[g][0], layout.bodies[g][0]))
        shift = {layout.bodies[g][0] - 1} if model.module.shift_logits else set()
        assert header & columns == (header if window == 8 else shift)
    torch.testing.assert_close(step_logits, refresh_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one request", "two, padded"])
def test_blocks_side_by_side_equal_the_masked_steps(model, prompts, monkeypatch):
    """Windowed isolated think blocks step side by side, each over its own keys (BlockCache:
    no mask for one request, a bias for padded prompts); the summary keeps the masked step.
    Same tokens, trace and steps as the plain masked steps."""
    settings = dict(blocks=3, block_len=10, summary_len=6, window=4, tokens_per_step=2)
    plain = _plain_steps(lambda: paradec.generate(model, prompts, **settings))
    built = _recording(monkeypatch)
    fast = paradec.generate(model, prompts, **settings)
    assert built == [([0, 1, 2], True, len(prompts) > 1), ([3], False, False)]
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert [r.trace for r in fast] == [r.trace for r in plain]


def test_a_long_prompt_keeps_the_masked_step(model, monkeypatch):
    """Six blocks and a prompt long next to them: six copies of its keys would cost more than
    the mask saves (step.SIDE_BY_SIDE_MAX_KEYS), so the think blocks keep the masked step."""
    built = _recording(monkeypatch)
    many = dict(blocks=6, block_len=6, summary_len=4, window=3, tokens_per_step=2)
    paradec.generate(model, " ".join(["a b c d e f g h"] * 20), **many)
    assert [(phase, per_block) for phase, per_block, _ in built] == [([0, 1, 2, 3, 4, 5], False), ([6], False)]


def test_a_headerless_block_of_a_shifted_model_keeps_the_masked_step(model, monkeypatch):
    """A shifted model (Dream) predicts a block's first token from the column before it; with
    no header that is the prompt's last token, outside the block: such a phase keeps the masked
    step, and decodes like the plain masked steps."""
    headers = model.think_header_ids
    monkeypatch.setattr(model, "think_header_ids", lambda i: [] if i == 1 else headers(i))
    settings = dict(blocks=3, block_len=12, summary_len=6, window=5, tokens_per_step=1)
    plain = _plain_steps(lambda: paradec.generate(model, PROMPTS, **settings))
    built = _recording(monkeypatch)
    fast = paradec.generate(model, PROMPTS, **settings)
    assert built[0][1] == (not model.module.shift_logits)
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert [r.trace for r in fast] == [r.trace for r in plain]


@pytest.mark.parametrize("case", ["prefix, periodic refresh", "unequal headers"])
def test_blocks_side_by_side_in_other_layouts(model, case, monkeypatch):
    """Side-by-side steps with a prefix cache and periodic refreshes, and with headers of
    different lengths (one request: the bias masks the shorter blocks' empty slots) decode like
    the plain masked steps."""
    settings = dict(blocks=3, block_len=10, summary_len=6, window=4, tokens_per_step=1)
    if case == "unequal headers":
        headers = model.think_header_ids
        monkeypatch.setattr(model, "think_header_ids", lambda i: headers(i) * i)
    else:
        settings |= dict(cache="prefix", refresh_every=2)
    plain = _plain_steps(lambda: paradec.generate(model, PROMPTS[:1], **settings))
    built = _recording(monkeypatch)
    fast = paradec.generate(model, PROMPTS[:1], **settings)
    assert built[0][1:] == (True, case == "unequal headers")
    assert [r.token_ids for r in fast] == [r.token_ids for r in plain]
    assert [r.trace for r in fast] == [r.trace for r in plain]


def test_nap_windows_refresh_partially_by_default(model):
    """partial_refresh left unset decodes nap windows as partial_refresh=True does (tokens, trace,
    forwards), and forwards fewer columns a forward than the full refresh, partial_refresh=False
    (whose tokens may differ)."""
    settings = dict(blocks=3, block_len=12, summary_len=6, window=3, tokens_per_step=1)
    columns = []  # query columns of every forward, counted at the first layer
    hook = model.module.layers[0].register_forward_pre_hook(lambda _, args: columns.append(args[0].shape[:-1].numel()))
    try:
        runs = {}
        for name, partial in (("default", None), ("partial", True), ("full", False)):
            columns.clear()
            runs[name] = (paradec.generate(model, PROMPTS[0], **settings, partial_refresh=partial), sum(columns))
    finally:
        hook.remove()
    (default, default_cols), (partial, partial_cols), (full, full_cols) = runs["default"], runs["partial"], runs["full"]
    assert default.token_ids == partial.token_ids
    assert default.trace == partial.trace
    assert (default.nfe, default_cols) == (partial.nfe, partial_cols)
    assert full_cols / full.nfe > default_cols / default.nfe  # the full refresh: more columns a forward


def test_fastdllm_rules_refresh_in_full_unless_asked(model):
    """With Fast-dLLM's rules a runner's nap windows refresh in full when partial_refresh is left
    unset (their window_steps refuses a partial refresh asked for by name); without the rules the
    same config's think phase refreshes partially."""
    from paradec.decoding.fastdllm_rules import FastDLLMRules
    from paradec.decoding.runner import Runner

    config = GenerationConfig(blocks=2, block_len=8, summary_len=4, window=2, tokens_per_step=1)
    layout = build_layout(model, config)
    prompts = [encode_prompt(model, PROMPTS[0], config, layout)]
    for rules, partial in ((FastDLLMRules(window_steps=4), False), (None, True)):
        runner = Runner(model, config, layout, prompts, fastdllm=rules)
        runner.run()
        assert [steps.partial for steps in runner.steps.values()] == [partial, partial], rules
