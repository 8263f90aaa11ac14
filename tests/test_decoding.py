"""The canvas engine keeps DESIGN.md's contracts 1, 2, 3 and 5 (tiny random models, CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paradec
from paradec import GenerationConfig
from paradec.api import build_layout, encode_prompt
from paradec.config import window_lengths
from paradec.decoding.runner import Runner
from paradec.decoding.schedule import group_schedule

from tiny import tiny_checkpoint

PROMPTS = ["the 3 + 4 is ?", "a b c d e f g h i j k l", "1 2"]


@pytest.fixture(scope="module", params=["llada", "dream"])
def model(request, tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=11)
    return paradec.load(root)


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=12)
    return paradec.load(root)


def check_contract_5(model, config: GenerationConfig, result) -> None:
    """Every body position committed exactly once, headers untouched, >= 1 commit per
    unfinished group per step, never the mask id, within the budget."""
    layout = build_layout(model, config)
    canvas, trace = torch.tensor(result.token_ids), torch.tensor(result.trace)
    assert model.spec.mask_id not in result.token_ids
    assert torch.equal(canvas[~layout.editable], layout.template[~layout.editable])  # headers
    assert (trace[~layout.editable] == -1).all() and (trace[layout.editable] >= 0).all()
    for g, (start, end) in enumerate(layout.bodies):
        steps = sorted(set(trace[start:end].tolist()))
        # A group is active on consecutive steps until it is done, committing on each.
        assert steps == list(range(steps[0], steps[-1] + 1)), (g, steps)
        if config.tokens_per_step is not None:
            windows = window_lengths(end - start, config.window_len)
            assert len(steps) <= sum(-(-w // config.tokens_per_step) for w in windows)
    if config.steps is not None:
        assert result.steps <= config.steps
    assert result.nfe == result.steps == int(trace.max()) + 1


budgets = st.one_of(
    st.tuples(st.none(), st.none()),
    st.tuples(st.integers(2, 12), st.none()),
    st.tuples(st.none(), st.integers(1, 4)),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blocks=st.integers(1, 4),
    block_len=st.integers(1, 7),
    summary_len=st.integers(1, 5),
    policy=st.sampled_from(["confidence", "margin", "entropy", "threshold", "factor"]),
    budget=budgets,
    schedule=st.sampled_from(["uniform", "linspace"]),
    temperature=st.sampled_from([0.0, 0.9]),
    seed=st.integers(0, 1000),
    attention=st.sampled_from(["isolated", "canvas"]),
    summary=st.sampled_from(["after", "concurrent"]),
    eos_closes_block=st.booleans(),
)
def test_nap_keeps_the_unmasking_invariants(model, blocks, block_len, summary_len, policy, budget, schedule,
                                            temperature, seed, attention, summary, eos_closes_block):
    steps, per_step = budget
    if policy in ("threshold", "factor"):
        per_step = None
    try:
        config = GenerationConfig(
            blocks=blocks, block_len=block_len, summary_len=summary_len, policy=policy, steps=steps,
            tokens_per_step=per_step, schedule=schedule, temperature=temperature, seed=seed,
            attention=attention, summary=summary, eos_closes_block=eos_closes_block,
            **({"threshold": 0.5} if policy == "threshold" else {}),  # threshold= implies its policy
        )
    except paradec.ConfigError:
        return  # a budget the config itself refuses (test_generate_errors.py)
    result = paradec.generate(model, PROMPTS[seed % 3], config)
    check_contract_5(model, config, result)
    if summary == "after":
        layout = build_layout(model, config)
        trace = torch.tensor(result.trace)
        think_end = layout.bodies[blocks - 1][1]
        s0, s1 = layout.bodies[blocks]
        assert trace[s0:s1].min() > trace[:think_end].max()  # summary strictly after thinking


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    mode=st.sampled_from(["ao", "ar_order", "random"]),
    answer_len=st.integers(1, 12),
    budget=budgets,
    seed=st.integers(0, 1000),
    temperature=st.sampled_from([0.0, 0.9]),
)
def test_plain_modes_keep_the_unmasking_invariants(model, mode, answer_len, budget, seed, temperature):
    steps, per_step = budget
    config = GenerationConfig(mode=mode, answer_len=answer_len, steps=steps, tokens_per_step=per_step,
                              seed=seed, temperature=temperature)
    result = paradec.generate(model, PROMPTS[seed % 3], config)
    check_contract_5(model, config, result)


def test_nap_commits_in_every_block_every_step(model):
    config = GenerationConfig(blocks=4, block_len=8, summary_len=4, tokens_per_step=2, eos_closes_block=False)
    result = paradec.generate(model, PROMPTS[0], config)
    layout = build_layout(model, config)
    trace = torch.tensor(result.trace)
    for start, end in layout.bodies[:4]:
        assert sorted(trace[start:end].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert result.steps == 4 + 2


def test_top_k_commits_exactly_the_schedule(model):
    config = GenerationConfig(blocks=2, block_len=10, summary_len=4, steps=8, schedule="linspace",
                              eos_closes_block=False)
    result = paradec.generate(model, PROMPTS[1], config)
    layout = build_layout(model, config)
    trace = torch.tensor(result.trace)
    (_, _, think_steps), _ = config.phase_budgets()
    expected = group_schedule(10, think_steps, None, "linspace")
    for start, end in layout.bodies[:2]:
        counts = torch.bincount(trace[start:end]).tolist()
        assert counts == expected


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_isolated_block_is_the_same_alone_or_with_the_others(model, temperature, window):
    """Contract 3: a think block's tokens do not depend on which other blocks are decoded, with
    whole blocks or windows (a windowed dual-cache phase steps and refreshes side by side)."""
    config = GenerationConfig(blocks=3, block_len=6, summary_len=3, tokens_per_step=2,
                              temperature=temperature, seed=5, window=window)
    layout = build_layout(model, config)
    prompt = encode_prompt(model, PROMPTS[0], config, layout)
    together = Runner(model, config, layout, [prompt]).run()
    for j in range(3):
        alone = Runner(model, config, layout, [prompt], think_blocks=[j]).run()
        start, end = layout.bodies[j]
        assert torch.equal(alone.canvas[0, start:end], together.canvas[0, start:end])
        assert torch.equal(alone.trace[0, start:end], together.trace[0, start:end])
        others = [g for g in range(3) if g != j]
        for g in others:  # untouched: still masked
            s, e = layout.bodies[g]
            assert (alone.canvas[0, s:e] == model.spec.mask_id).all()


@pytest.mark.parametrize("mode, temperature", [("nap", 0.0), ("nap", 0.8), ("ao", 0.8)])
def test_batch_equals_one_by_one(model, mode, temperature):
    config = GenerationConfig(mode=mode, blocks=2, block_len=5, summary_len=3, answer_len=6,
                              temperature=temperature, seed=40)
    batch = paradec.generate(model, PROMPTS, config)
    for r, prompt in enumerate(PROMPTS):
        alone = paradec.generate(model, prompt, config, seed=40 + r)
        assert alone.token_ids == batch[r].token_ids and alone.trace == batch[r].trace


def test_seeds_make_sampling_reproducible(model):
    config = GenerationConfig(blocks=2, block_len=6, summary_len=3, temperature=1.0, seed=3)
    a, b = paradec.generate(model, PROMPTS[0], config), paradec.generate(model, PROMPTS[0], config)
    c = paradec.generate(model, PROMPTS[0], config, seed=4)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_result_fields(model):
    result = paradec.generate(model, PROMPTS[0], blocks=2, block_len=4, summary_len=3)
    assert len(result.blocks) == 2 and isinstance(result.summary, str)
    assert len(result.trace) == len(result.token_ids)
    assert result.prompt_ids == encode_prompt(model, PROMPTS[0], GenerationConfig(), build_layout(model, GenerationConfig()))
    for phase in ("prefill", "steps", "think", "summary", "total"):
        assert result.timings[phase] >= 0
    assert result.timings["total"] >= result.timings["steps"] > 0


def _eos_heavy(tmp_path, family="llada"):
    """A model whose EOS is the token it predicts most often, so EOS handling is exercised."""
    import json
    from collections import Counter

    root, config, _ = tiny_checkpoint(tmp_path, family, seed=13)
    probe = GenerationConfig(blocks=3, block_len=8, summary_len=4, eos_closes_block=False)
    result = paradec.generate(paradec.load(root), PROMPTS[0], probe)
    favourite = Counter(t for ids in result.block_token_ids for t in ids).most_common(1)[0][0]
    (root / "config.json").write_text(json.dumps(config | {"eos_token_id": favourite}))
    model = paradec.load(root)
    assert model.spec.eos_id == favourite
    return model


def test_eos_fills_the_rest_of_a_block(tmp_path):
    model = _eos_heavy(tmp_path)
    config = GenerationConfig(blocks=3, block_len=8, summary_len=4)
    result = paradec.generate(model, PROMPTS[0], config)
    layout = build_layout(model, config)
    eos = model.spec.eos_id
    saw_fill = False
    for start, end in layout.bodies:
        body, trace = result.token_ids[start:end], result.trace[start:end]
        for p, token in enumerate(body):
            if token != eos:
                continue
            # Whatever came after an EOS once it was committed is EOS (earlier commits stay).
            later = [(t, s) for t, s in zip(body[p + 1:], trace[p + 1:]) if s >= trace[p]]
            assert all(t == eos for t, _ in later)
            saw_fill |= any(s == trace[p] for _, s in later)
    assert saw_fill  # at least one block was closed by filling, not by decoding each EOS
    off = paradec.generate(model, PROMPTS[0], config, eos_closes_block=False)
    assert off.nfe >= result.nfe


def test_eos_can_be_barred(tmp_path):
    model = _eos_heavy(tmp_path)
    stops = set(model.spec.stop_ids)
    config = GenerationConfig(blocks=2, block_len=6, summary_len=5, bar_eos_in_blocks=True, summary_min_tokens=3)
    result = paradec.generate(model, PROMPTS[0], config)
    layout = build_layout(model, config)
    for start, end in layout.bodies[:2]:
        assert not stops & set(result.token_ids[start:end])
    s0, _ = layout.bodies[2]
    assert not stops & set(result.token_ids[s0:s0 + 3])
    free = paradec.generate(model, PROMPTS[0], config, bar_eos_in_blocks=False, summary_min_tokens=0)
    assert stops & set(free.token_ids[: layout.bodies[1][1]])  # unbarred, this model does write EOS


def test_user_text_never_becomes_a_special_token(llada):
    config = GenerationConfig()
    layout = build_layout(llada, config)
    ids = encode_prompt(llada, "the <|mask|> is <summary>", config, layout)
    vocab = llada.tokenizer.get_vocab()
    assert vocab["<|mask|>"] not in ids and vocab["<summary>"] not in ids


def test_chat_template_wraps_user_text(tmp_path):
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=14)
    config_path = root / "tokenizer_config.json"
    import json

    tok_config = json.loads(config_path.read_text())
    tok_config["chat_template"] = "{% for m in messages %}<|eot_id|>{{ m['content'] }}<|eot_id|>{% endfor %}the"
    config_path.write_text(json.dumps(tok_config))
    model = paradec.load(root)
    vocab = model.tokenizer.get_vocab()
    config = GenerationConfig()
    layout = build_layout(model, config)
    ids = encode_prompt(model, "a <|eot_id|> b", config, layout)
    eot = vocab["<|eot_id|>"]
    assert ids[0] == eot and ids[-2] == eot and ids[-1] == vocab["the"]  # template tokens are special
    assert ids[1:-2].count(eot) == 0  # the user's "<|eot_id|>" is plain text
    raw = encode_prompt(model, "a b", GenerationConfig(chat_template=False), layout)
    assert raw == [vocab["a"], vocab["b"]]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_blocks_apart_then_summary_equals_one_run(model, temperature):
    """What the distributed runner does, in one process: each block decoded alone, the tokens
    merged, the summary decoded from them — equal to decoding everything together."""
    config = GenerationConfig(blocks=3, block_len=6, summary_len=4, tokens_per_step=2,
                              temperature=temperature, seed=8)
    layout = build_layout(model, config)
    prompts = [encode_prompt(model, p, config, layout) for p in PROMPTS[:2]]
    together = Runner(model, config, layout, prompts).run()
    canvas = layout.template.repeat(2, 1)
    trace = torch.full_like(canvas, -1)
    for j in range(3):
        part = Runner(model, config, layout, prompts, think_blocks=[j]).run()
        start, end = layout.bodies[j]
        canvas[:, start:end], trace[:, start:end] = part.canvas[:, start:end], part.trace[:, start:end]
    summary = Runner(model, config, layout, prompts, think_blocks=[], summary=True)
    merged = summary.run(start=(canvas, trace, int(trace.max()) + 1))
    assert torch.equal(merged.canvas, together.canvas) and torch.equal(merged.trace, together.trace)


def test_a_request_that_finishes_early_waits_in_padding(model):
    """Requests of one batch finish at different steps; the finished one forwards padding."""
    prompts = [PROMPTS[0], PROMPTS[1]]
    config = GenerationConfig(blocks=2, block_len=6, summary_len=3, temperature=1.0, seed=60)
    layout = build_layout(model, config)
    encoded = [encode_prompt(model, p, config, layout) for p in prompts]
    runner = Runner(model, config, layout, encoded)
    runner.canvas[0, layout.bodies[0][0]:layout.bodies[1][1]] = 7  # request 0's blocks are already written
    runner.trace[0, layout.bodies[0][0]:layout.bodies[1][1]] = 0
    out = runner.run()
    alone = paradec.generate(model, prompts[1], config, seed=61)
    assert out.canvas[1].tolist() == alone.token_ids
