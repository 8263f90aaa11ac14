"""The step body against the reference decoder (``reference_decoder.py``), in the exact modes.

``paradec.generate`` decodes with the runner's one static-shape step body; the reference decodes
the same request alone, one full no-cache forward per step, with the rules written out in
loops. In float32 on the CPU both must give the same tokens, the same trace and the same step
count. Where they disagree, the reference's margin at the first step that differs says whether
the decision there was a near tie (both within the last bits of float32: skipped, with the gap
in the message) or not (a failure: a bug in one of them).

Also here: a request batched with prompts of other lengths decodes as it does alone (DESIGN.md
contracts 3 and 7), at temperature 0 and above, in nap and block modes.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import paradec
from paradec.api import build_layout, encode_prompt, resolve_config
from paradec.errors import ConfigError

from reference_decoder import TIE_TOL, reference_decode, reference_plan
from tiny import tiny_checkpoint

PROMPTS = ["the 3 + 4 is ?", "a b c d e f g h i j k l", "1 2"]
FAMILIES = ["llada", "dream"]


class NearTie(Exception):
    """The runner and the reference part at a step whose decision was within ``TIE_TOL``."""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny LLaDA and Dream checkpoints, each plain and ``-eos``: with the EOS id moved to a
    token the model writes often, so EOS filling and barring have something to do."""
    out = {}
    for family in FAMILIES:
        root, config, _ = tiny_checkpoint(tmp_path_factory.mktemp(family), family, seed=11)
        out[family] = paradec.load(root)
        root, config, _ = tiny_checkpoint(tmp_path_factory.mktemp(family + "-eos"), family, seed=14)
        probe = paradec.generate(paradec.load(root), PROMPTS[0], blocks=3, block_len=8, summary_len=4,
                                 eos_closes_block=False)
        counts = Counter(t for ids in probe.block_token_ids for t in ids).most_common()
        eos = counts[min(1, len(counts) - 1)][0]  # the second most frequent: EOS often, not always
        (root / "config.json").write_text(json.dumps(config | {"eos_token_id": eos}))
        out[family + "-eos"] = paradec.load(root)
        assert out[family + "-eos"].spec.eos_id == eos
    return out


# --- comparing ---------------------------------------------------------------------------------
def compare(tokens: list[int], trace: list[int], steps: int, ref, context: str) -> None:
    """Raises AssertionError (a bug) or NearTie where the runner's output differs from the
    reference's."""
    if tokens == ref.canvas and trace == ref.trace and steps == ref.steps:
        return
    differ = [c for c in range(len(tokens)) if (tokens[c], trace[c]) != (ref.canvas[c], ref.trace[c])]
    if not differ:
        raise AssertionError(f"{context}: same tokens and trace, but {steps} steps against the reference's {ref.steps}")
    first = min(min((t for t in (trace[c], ref.trace[c]) if t >= 0), default=0) for c in differ)
    note = ref.margin_at(first)
    detail = (f"{context}: first difference at step {first}, columns {differ[:8]}; runner tokens "
              f"{[tokens[c] for c in differ[:8]]} trace {[trace[c] for c in differ[:8]]}, reference tokens "
              f"{[ref.canvas[c] for c in differ[:8]]} trace {[ref.trace[c] for c in differ[:8]]}; the reference's "
              f"margin there: {note}")
    if note is not None and note.margin < TIE_TOL:
        raise NearTie(detail)
    raise AssertionError(detail)


def check(model, prompt, **settings) -> None:
    """``paradec.generate`` against the reference on one prompt; a near tie skips."""
    config = resolve_config(model, None, **settings)
    result = paradec.generate(model, prompt, config)
    ids = encode_prompt(model, prompt, config, build_layout(model, config))
    ref = reference_decode(model, config, ids)
    assert result.nfe == result.steps
    try:
        compare(result.token_ids, result.trace, result.steps, ref, f"{settings}")
    except NearTie as tie:
        pytest.skip(f"near tie: {tie}")


def test_reference_plan_matches_the_runners_plan(models):
    """The reference cuts its phases, windows and quotas itself; they are the runner's."""
    from paradec.decoding.plan import make_plan

    model = models["llada"]
    for overrides in [dict(blocks=3, block_len=7, summary_len=4, steps=9, window=3, cache="none"),
                      dict(blocks=2, block_len=5, summary_len=6, tokens_per_step=2, summary="concurrent"),
                      dict(mode="block", answer_len=11, block_len=4, steps=6, schedule="linspace", cache="none"),
                      dict(mode="ao", answer_len=9, steps=4)]:
        config = resolve_config(model, None, **overrides)
        layout = build_layout(model, config)
        ours, theirs = reference_plan(config, layout), make_plan(config, layout, False)
        assert ours.phases == theirs.phases
        assert ours.windows == theirs.windows
        assert ours.schedules == theirs.schedules


# --- a grid of settings --------------------------------------------------------------------------
NAP = dict(blocks=3, block_len=6, summary_len=4)
GRID = {
    "nap-isolated-confidence-k2": NAP | dict(tokens_per_step=2),
    "nap-canvas-margin-steps": NAP | dict(attention="canvas", policy="margin", steps=8),
    "nap-isolated-entropy-linspace": NAP | dict(policy="entropy", steps=7, schedule="linspace"),
    "nap-concurrent-canvas-k2": NAP | dict(summary="concurrent", attention="canvas", tokens_per_step=2),
    "nap-concurrent-isolated-steps": NAP | dict(summary="concurrent", steps=5, schedule="linspace"),
    "nap-threshold": NAP | dict(policy="threshold", threshold=0.08),
    "nap-threshold-steps-canvas": NAP | dict(policy="threshold", threshold=0.15, steps=6, attention="canvas"),
    "nap-factor": NAP | dict(policy="factor", factor=1.9),
    "nap-factor-steps": NAP | dict(policy="factor", factor=1.2, steps=5, schedule="linspace"),
    "nap-sampled": NAP | dict(temperature=0.8, seed=3, tokens_per_step=2),
    "nap-sampled-canvas-margin": NAP | dict(temperature=1.2, seed=4, policy="margin", attention="canvas", steps=6),
    "nap-sampled-threshold": NAP | dict(temperature=0.9, seed=5, policy="threshold", threshold=0.1),
    "nap-rank-temperature": NAP | dict(temperature=0.7, seed=6, rank_temperature=0.3, tokens_per_step=2),
    "nap-top-k-top-p": NAP | dict(temperature=1.0, seed=7, top_k=5, top_p=0.9, score_on="sampling"),
    "nap-window": NAP | dict(block_len=7, window=3, cache="none", tokens_per_step=2),
    "nap-window-canvas-steps": NAP | dict(block_len=7, window=3, cache="none", attention="canvas", steps=10),
    "nap-window-sampled-factor": NAP | dict(window=4, cache="none", temperature=0.8, seed=8, policy="factor"),
    "ao": dict(mode="ao", answer_len=10, tokens_per_step=2),
    "ao-canvas-sampled": dict(mode="ao", answer_len=10, attention="canvas", temperature=0.9, seed=9, steps=4),
    "ar-order": dict(mode="ar_order", answer_len=9, steps=4),
    "ar-order-sampled": dict(mode="ar_order", answer_len=9, temperature=1.0, seed=10),
    "random": dict(mode="random", answer_len=10, tokens_per_step=3, seed=11),
    "random-sampled-canvas": dict(mode="random", answer_len=10, attention="canvas", temperature=0.8, seed=12),
    "block": dict(mode="block", answer_len=12, block_len=4, cache="none", tokens_per_step=2),
    "block-canvas-steps": dict(mode="block", answer_len=11, block_len=4, cache="none", attention="canvas", steps=6),
    "block-threshold-sampled": dict(mode="block", answer_len=12, block_len=5, cache="none", policy="threshold",
                                    threshold=0.1, temperature=0.8, seed=13),
}
EOS_GRID = {
    "nap-eos": NAP | dict(tokens_per_step=2),
    "nap-eos-off": NAP | dict(eos_closes_block=False),
    "nap-eos-barred": NAP | dict(bar_eos_in_blocks=True, summary_min_tokens=2, steps=8),
    "nap-eos-sampled-canvas": NAP | dict(temperature=0.9, seed=14, attention="canvas", summary="concurrent"),
    "nap-eos-window": NAP | dict(block_len=8, window=3, cache="none", policy="threshold", threshold=0.1),
    "ao-eos": dict(mode="ao", answer_len=10, temperature=0.7, seed=15),
    "block-eos": dict(mode="block", answer_len=12, block_len=4, cache="none", policy="factor", factor=1.5),
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(GRID))
def test_grid(models, family, name):
    check(models[family], PROMPTS[0], **GRID[name])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", sorted(EOS_GRID))
def test_eos_grid(models, family, name):
    check(models[family + "-eos"], PROMPTS[1], **EOS_GRID[name])


def test_eos_models_do_write_eos(models):
    """The EOS models exercise EOS filling: at one token per block per step, a position
    committed at the same step as an earlier EOS of its block was filled."""
    for family in FAMILIES:
        model = models[family + "-eos"]
        result = paradec.generate(model, PROMPTS[1], **NAP)
        layout = build_layout(model, resolve_config(model, None, **NAP))
        stops, filled = set(model.spec.stop_ids), 0
        for start, end in layout.bodies:
            body, trace = result.token_ids[start:end], result.trace[start:end]
            first = next((p for p, t in enumerate(body) if t in stops), None)
            if first is not None:
                filled += sum(1 for p in range(first + 1, end - start) if trace[p] == trace[first])
        assert filled, family


# --- random settings -------------------------------------------------------------------------
@st.composite
def random_settings(draw) -> dict:
    mode = draw(st.sampled_from(["nap", "nap", "nap", "ao", "ar_order", "random", "block"]))
    policy = draw(st.sampled_from(["confidence", "margin", "entropy", "threshold", "factor"]))
    settings = dict(mode=mode, attention=draw(st.sampled_from(["isolated", "canvas"])),
                    seed=draw(st.integers(0, 1000)), eos_closes_block=draw(st.booleans()),
                    schedule=draw(st.sampled_from(["uniform", "linspace"])))
    if mode not in ("ar_order", "random"):
        settings["policy"] = policy
    if policy == "threshold":
        settings["threshold"] = draw(st.sampled_from([0.05, 0.1, 0.2, 1.0]))
    if policy == "factor":
        settings["factor"] = draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
    if mode == "nap":
        summary_len = draw(st.integers(1, 5))
        settings |= dict(blocks=draw(st.integers(1, 3)), block_len=draw(st.integers(1, 7)), summary_len=summary_len,
                         summary=draw(st.sampled_from(["after", "concurrent"])), bar_eos_in_blocks=draw(st.booleans()),
                         summary_min_tokens=draw(st.integers(0, min(2, summary_len))))
        if settings["summary"] == "after" and draw(st.booleans()):
            settings |= dict(window=draw(st.integers(1, 4)), cache="none")
    else:
        settings["answer_len"] = draw(st.integers(1, 12))
        if mode == "block":
            settings |= dict(block_len=draw(st.integers(1, 5)), cache="none")
    budget = draw(st.sampled_from(["none", "steps", "tokens"]))
    if budget == "steps":
        settings["steps"] = draw(st.integers(2, 12))
    elif budget == "tokens" and policy not in ("threshold", "factor"):
        settings["tokens_per_step"] = draw(st.integers(1, 4))
    if draw(st.booleans()):
        settings["temperature"] = draw(st.sampled_from([0.5, 1.0, 1.5]))
        if draw(st.booleans()) and mode not in ("ar_order", "random") and policy in ("confidence", "margin",
                                                                                        "entropy"):
            settings["rank_temperature"] = draw(st.sampled_from([0.2, 1.0]))
        if draw(st.booleans()):  # the filters and the sampling-distribution scores (scored by the twin)
            settings |= dict(top_k=draw(st.sampled_from([None, 1, 4])), top_p=draw(st.sampled_from([None, 0.5, 0.9])),
                             score_on=draw(st.sampled_from(["model", "sampling"])))
    return settings


@pytest.mark.parametrize("family", ["llada", "dream", "llada-eos", "dream-eos"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(settings_=random_settings(), prompt=st.sampled_from(PROMPTS))
def test_random_settings(models, family, settings_, prompt):
    model = models[family]
    try:
        config = resolve_config(model, None, **settings_)
    except ConfigError as err:  # e.g. a step budget too small for the windows
        event(f"refused: {str(err)[:40]}")
        assume(False)
    result = paradec.generate(model, prompt, config)
    ref = reference_decode(model, config, encode_prompt(model, prompt, config, build_layout(model, config)))
    assert result.nfe == result.steps
    try:
        compare(result.token_ids, result.trace, result.steps, ref, f"{settings_} prompt={prompt!r}")
    except NearTie:
        event("near tie")
        assume(False)


# --- batching (contracts 3 and 7) -----------------------------------------------------------------
def dense_rank(trace: list[int]) -> list[int]:
    """Each step number replaced by its rank among the request's own steps (-1 kept): in a batch
    a request waits (commits nothing) while the others finish a phase or window, alone it never
    waits, so its own steps are what must agree."""
    steps = {s: i for i, s in enumerate(sorted(set(trace) - {-1}))}
    return [steps.get(s, -1) for s in trace]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("settings_", [
    NAP | dict(tokens_per_step=2),
    NAP | dict(attention="canvas", steps=7, policy="threshold", threshold=0.1),
    dict(mode="block", answer_len=12, block_len=4, cache="none", steps=6),
    dict(mode="block", answer_len=12, block_len=4, cache="none", policy="threshold", threshold=0.02),
    dict(mode="block", answer_len=12, block_len=4, tokens_per_step=2),  # Fast-dLLM's dual cache
], ids=["nap", "nap-canvas-threshold", "block", "block-threshold", "block-dual-cache"])
def test_batched_request_equals_it_alone(models, family, temperature, settings_):
    """Each request of a batch of three prompts of different lengths gets the tokens it gets
    alone, and commits them at the same steps of its own (the threshold rules and early EOS make
    some requests wait for the others at a phase or window's end), and alone it matches the
    reference where the mode is exact."""
    model = models[family + "-eos"]
    config = resolve_config(model, None, temperature=temperature, seed=21, **settings_)
    layout = build_layout(model, config)
    batch = paradec.generate(model, PROMPTS, config)
    assert len({len(encode_prompt(model, p, config, layout)) for p in PROMPTS}) == 3  # mixed lengths
    for r, prompt in enumerate(PROMPTS):
        alone = paradec.generate(model, prompt, config, seed=21 + r)
        exact = config.window_len is None or config.cache_mode == "none"
        ref = reference_decode(model, config, encode_prompt(model, prompt, config, layout), request=r) if exact \
            else None
        if ref is not None:
            try:
                compare(alone.token_ids, alone.trace, alone.steps, ref, f"alone r={r}")
            except NearTie as tie:
                pytest.skip(f"near tie: {tie}")
        if batch[r].token_ids == alone.token_ids and dense_rank(batch[r].trace) == alone.trace:
            continue
        differ = [c for c, (a, b) in enumerate(zip(dense_rank(batch[r].trace), alone.trace)) if a != b
                  or batch[r].token_ids[c] != alone.token_ids[c]]
        first = min(alone.trace[c] for c in differ)
        note = ref.margin_at(first) if ref is not None else None
        message = (f"request {r}: batched differs from alone from its step {first} (columns {differ[:8]}); "
                   f"reference margin there: {note}")
        if note is not None and note.margin < TIE_TOL:
            pytest.skip(f"near tie: {message}")
        raise AssertionError(message)


@pytest.mark.parametrize("headers", [dict(summary_header=""), dict(think_header="", summary_header="")],
                         ids=["headerless-summary", "no-headers"])
@pytest.mark.parametrize("settings_", [
    NAP | dict(tokens_per_step=2),
    NAP | dict(policy="threshold", threshold=0.1, temperature=0.8, seed=3),
    NAP | dict(block_len=7, window=3, cache="none"),
    NAP | dict(summary="concurrent"),
], ids=["nap", "nap-threshold-sampled", "nap-window", "nap-concurrent"])
def test_a_shifted_model_without_headers_decodes_as_the_reference(tmp_path, headers, settings_):
    """A Dream-style checkpoint whose config leaves headers empty: each headerless group's first
    token is predicted from the column before it (the prompt's last, the previous block's, the
    last think block's: the summary's refresh and exact steps read that one from the cache's
    extension, ``PromptCache.last_hidden``)."""
    root, _, _ = tiny_checkpoint(tmp_path, "dream", seed=11, paradec=headers)
    model = paradec.load(root)
    assert model.summary_header_ids() == []
    for prompt in PROMPTS:
        check(model, prompt, **settings_)
