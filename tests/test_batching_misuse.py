"""Misuse of the continuous-batching engine (``paradec.batching``): bad ids, prompts and settings
are refused at ``add`` by name and leave the engine as it was (nothing queued, no id kept, the
requests already there decode exactly as alone); a request that can never fit a row is refused
before its canvas is built; aborts of unknown, finished and already aborted ids; a step that
raises; ``BatchEngine.generate`` and ``warm_up`` misused; ``AsyncBatchEngine`` consumers that
leave early, abort, collide on ids, send bad requests, or arrive as the stepper ends (every wait
bounded by ``asyncio.wait_for``, so a hang fails instead of sticking). paradec-tiny on a CPU."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import paradec
import paradec.batching.engine as engine_module
import paradec.batching.stream as stream_module
from paradec import ConfigError, GenerationConfig, InputError
from paradec.batching import AsyncBatchEngine, BatchEngine, RequestAborted
from paradec.train.tasks import arith

from test_batching import assert_same

QUESTIONS = [p.question for p in arith.test_problems()[:20]]
SMALL = dict(blocks=2, block_len=10, summary_len=6)
TINY = dict(blocks=1, block_len=4, summary_len=3)  # the cheapest nap canvas
pytestmark = pytest.mark.filterwarnings("ignore:the header .* tokenises to the unknown token:UserWarning")


@pytest.fixture(scope="module")
def model():
    return paradec.load("paradec-tiny")


_SOLO: dict = {}


def solo(model, prompt, settings: dict):
    """``paradec.generate`` of the request alone (memoised)."""
    key = (repr(prompt), repr(sorted(settings.items())))
    if key not in _SOLO:
        _SOLO[key] = paradec.generate(model, prompt, **settings)
    return _SOLO[key]


def make_engine(model, **kwargs) -> BatchEngine:
    return BatchEngine(model, **(dict(max_prompt_tokens=64, max_canvas_tokens=192) | kwargs))


def drain(engine: BatchEngine, results: dict | None = None, limit: int = 2000) -> dict:
    results = {} if results is None else results
    for _ in range(limit):
        if not engine.has_unfinished():
            return results
        for out in engine.step():
            if out.finished:
                assert out.request_id not in results, f"{out.request_id} finished twice"
                results[out.request_id] = out.result
    pytest.fail("the engine does not finish")


def state(engine: BatchEngine):
    return ([s.request_id for s in engine.waiting], [(s.request_id, s.row) for s in engine.live], set(engine.ids))


# --- add: refusals leave the engine unchanged -----------------------------------------------------
BAD_ADDS = [  # (request id, prompt, settings, error, a name the message holds)
    (None, QUESTIONS[0], {}, InputError, "request_id"),
    (3, QUESTIONS[0], {}, InputError, "request_id"),
    (b"x", QUESTIONS[0], {}, InputError, "request_id"),
    ("", QUESTIONS[0], {}, InputError, "request_id"),
    ("live", QUESTIONS[0], {}, InputError, "in use"),  # decoding
    ("waiting", QUESTIONS[0], {}, InputError, "in use"),  # queued
    ("new", "", {}, InputError, "empty"),
    ("new", "   ", {}, InputError, "empty"),
    ("new", [], {}, InputError, "empty"),
    ("new", [{"role": "user", "content": ""}], {}, InputError, "no tokens"),  # chat that encodes to nothing
    ("new", [{"role": "user", "content": " "}], dict(attention="canvas"), InputError, "no tokens"),
    ("new", [7, 10_000], {}, InputError, "token ids must lie"),  # out of the vocabulary
    ("new", [7, -1], {}, InputError, "token ids must lie"),
    ("new", [7.0, 8.0], {}, InputError, "must be ints"),
    ("new", [True, 7], {}, InputError, "must be ints"),
    ("new", ["a", "b"], {}, InputError, "must be ints"),
    ("new", [[7, 8]], {}, InputError, "must be ints"),
    ("new", {"role": "user", "content": "hi"}, {}, InputError, "dict"),
    ("new", None, {}, InputError, "None"),
    ("new", 7, {}, InputError, "int"),
    ("new", torch.tensor([[7, 8]]), {}, InputError, "1-D"),
    ("new", torch.tensor([7.0, 8.0]), {}, InputError, "integers"),
    ("new", [1], {}, InputError, "mask id"),  # paradec-tiny's mask id
    ("new", QUESTIONS[0], dict(bogus=1), ConfigError, "bogus"),
    ("new", QUESTIONS[0], dict(steps=-1), ConfigError, "steps"),
    ("new", QUESTIONS[0], dict(steps=float("nan")), ConfigError, "steps"),
    ("new", QUESTIONS[0], dict(policy="threshold", threshold=-0.5), ConfigError, "threshold"),
    ("new", QUESTIONS[0], dict(policy="threshold", threshold=float("nan")), ConfigError, "threshold"),
    ("new", QUESTIONS[0], dict(temperature=-1.0), ConfigError, "temperature"),
    ("new", QUESTIONS[0], dict(temperature=float("nan")), ConfigError, "temperature"),
    ("new", QUESTIONS[0], dict(seed=-1), ConfigError, "seed"),
    ("new", QUESTIONS[0], dict(seed=float("nan")), ConfigError, "seed"),
    ("new", QUESTIONS[0], dict(blocks=0), ConfigError, "blocks"),
    ("new", QUESTIONS[0], dict(block_len=0), ConfigError, "block_len"),
    ("new", QUESTIONS[0], dict(SMALL, stop=""), ConfigError, "stop"),
]


def test_refused_adds_leave_the_engine_unchanged(model):
    """Mid-decode (one request live, one waiting), every bad add raises its error by name and
    changes nothing: no request queued, no id reserved; then both decode exactly as alone."""
    engine = make_engine(model, max_batch=1)
    engine.add("live", QUESTIONS[0], **TINY)
    engine.add("waiting", QUESTIONS[1], **TINY)
    engine.step()
    before = state(engine)
    for rid, prompt, kwargs, error, name in BAD_ADDS:
        settings = kwargs if set(kwargs) & {"blocks", "block_len", "stop"} else dict(TINY, **kwargs)
        with pytest.raises(error, match=name):
            engine.add(rid, prompt, **settings)
        assert state(engine) == before, (rid, prompt, kwargs)
    for bad in ("yes", 1, None):
        with pytest.raises(InputError, match="stream"):
            engine.add("new", QUESTIONS[0], stream=bad, **TINY)
    assert state(engine) == before
    results = drain(engine)
    assert set(results) == {"live", "waiting"}
    assert_same(results["live"], solo(model, QUESTIONS[0], TINY))
    assert_same(results["waiting"], solo(model, QUESTIONS[1], TINY))
    assert not engine.ids


def test_ids_are_free_again_after_finish_and_abort_even_within_the_same_step(model):
    """An id is reusable once its request finished (even while iterating the outputs of the step
    it finished in) or was aborted (waiting or live); the reused id decodes its new request."""
    engine = make_engine(model, max_batch=2)
    engine.add("a", QUESTIONS[0], **TINY)
    engine.add("b", QUESTIONS[1], **TINY)
    engine.add("c", QUESTIONS[2], **TINY)  # waits
    engine.step()
    assert engine.abort("b") and engine.abort("c")
    engine.add("b", QUESTIONS[3], **TINY)
    engine.add("c", QUESTIONS[4], **TINY)
    results, reused = {}, False
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results.setdefault(out.request_id, []).append(out.result)
                if out.request_id == "a" and not reused:
                    engine.add("a", QUESTIONS[5], **TINY)  # the id it finished under, at once
                    reused = True
    assert reused and not engine.ids
    assert [len(r) for r in (results["a"], results["b"], results["c"])] == [2, 1, 1]
    assert_same(results["a"][0], solo(model, QUESTIONS[0], TINY))
    assert_same(results["a"][1], solo(model, QUESTIONS[5], TINY))
    assert_same(results["b"][0], solo(model, QUESTIONS[3], TINY))
    assert_same(results["c"][0], solo(model, QUESTIONS[4], TINY))


# --- add: settings the engine cannot serve ----------------------------------------------------
def test_a_seed_past_int64_is_refused_at_add_and_never_drops_the_batch(model):
    """A seed the rows' int64 seeds cannot hold must be refused at ``add``, by name. (before session 19: it is
    accepted, and the step that admits it raises ``ValueError: Overflow when unpacking long
    long``, which drops every live request with it.)"""
    engine = make_engine(model, max_batch=2)
    engine.add("good", QUESTIONS[0], **SMALL)
    engine.step()
    for seed in (2**63, 2**70):
        with pytest.raises(ConfigError, match="seed"):
            engine.add("huge-seed", QUESTIONS[1], **SMALL, seed=seed)
        assert "huge-seed" not in engine.ids and not engine.waiting
    results = drain(engine)
    assert_same(results["good"], solo(model, QUESTIONS[0], SMALL))


def test_stop_strings_for_a_model_without_a_tokenizer_are_refused_at_add(model):
    """``stop`` cuts text, which needs a tokenizer: refused at ``add`` by name, as ``generate`` refuses it,
    and the live request decodes on as alone (before: accepted, and its result's text was the ids'
    ``str`` cut at the stop string, with no tokens and finish_reason "stop")."""
    bare = paradec.api.DiffusionModel(module=model.module, spec=model.spec, tokenizer=None)
    kwargs = dict(mode="ao", answer_len=6)
    engine = make_engine(bare, max_batch=2)
    engine.add("live", [7, 8, 9], **kwargs)
    engine.step()
    before = state(engine)
    with pytest.raises(InputError, match="stop"):
        engine.add("stopped", [7, 8, 9], stop="5", **kwargs)
    assert state(engine) == before
    assert_same(drain(engine)["live"], paradec.generate(bare, [7, 8, 9], **kwargs))


def test_the_largest_int64_seed_decodes_as_alone(model):
    kwargs = dict(TINY, temperature=0.8, seed=2**63 - 1)
    engine = make_engine(model, max_batch=2)
    engine.add("max-seed", QUESTIONS[2], **kwargs)
    engine.add("other", QUESTIONS[3], **TINY)
    results = drain(engine)
    assert_same(results["max-seed"], solo(model, QUESTIONS[2], kwargs))
    assert_same(results["other"], solo(model, QUESTIONS[3], TINY))


@pytest.mark.parametrize("prompt,kwargs,error,name", [
    # a canvas far past the rows: refused by the engine's limit, not after building it (before session 19: a
    # block_len of 10**7 takes ~20 s and 1.5 GB to be refused, 10**9 gets the process killed)
    pytest.param(QUESTIONS[0], dict(blocks=2, block_len=10**5, summary_len=6), (InputError, ConfigError),
                 "max_canvas_tokens", id="block_len"),
    pytest.param(QUESTIONS[0], dict(blocks=2, block_len=10, summary_len=10**5), (InputError, ConfigError),
                 "max_canvas_tokens", id="summary_len"),
    pytest.param(QUESTIONS[0], dict(mode="block", answer_len=10**6, block_len=4), (InputError, ConfigError),
                 "max_canvas_tokens", id="answer_len"),
    # more think blocks than the engine decodes: named max_blocks whatever else is wrong (BUG:
    # past the model's length the message names only that, after building every header)
    pytest.param(QUESTIONS[0], dict(blocks=100, block_len=1, summary_len=1), ConfigError, "max_blocks",
                 id="blocks"),
    # a prompt past the rows and past the model: named max_prompt_tokens (before session 19: names the model's length)
    pytest.param([7] * 600, dict(SMALL), (InputError, ConfigError), "max_prompt_tokens", id="prompt"),
])
def test_a_request_that_can_never_fit_is_refused_by_the_limit_before_its_canvas_is_built(model, monkeypatch,
                                                                                          prompt, kwargs, error,
                                                                                          name):
    engine = make_engine(model, max_batch=2, max_blocks=4)
    built = []
    real = engine_module.build_layout

    def recording(model_, config):
        layout = real(model_, config)
        built.append((layout.length, layout.num_think_blocks))
        return layout

    monkeypatch.setattr(engine_module, "build_layout", recording)
    engine.add("live", QUESTIONS[1], **TINY)
    before = state(engine)
    with pytest.raises(error, match=name):
        engine.add("huge", prompt, **kwargs)
    assert state(engine) == before
    assert all(length <= engine.geometry.max_canvas and blocks <= engine.max_blocks for length, blocks in built[1:]), \
        f"a canvas past the engine's limits was built: {built[1:]}"
    assert_same(drain(engine)["live"], solo(model, QUESTIONS[1], TINY))


def test_a_prompt_of_bytes_is_refused(model):
    """``b"..."`` is text in the wrong type, not token ids (before session 19: b"abc" decodes as ids [97, 98, 99])."""
    engine = make_engine(model)
    for prompt in (b"12 + 3 = ?", bytearray(b"12")):
        with pytest.raises(InputError, match="bytes|bytearray|str"):
            engine.add("bytes", prompt, **TINY)
    assert not engine.has_unfinished() and not engine.ids


def test_a_config_is_a_generation_config_or_a_mapping_of_settings(model):
    """``add(..., config=...)`` takes what ``paradec.generate`` takes: a GenerationConfig or a mapping
    of settings (a name also given as a keyword is refused, as generate() refuses it); anything else is
    a ConfigError naming ``config`` (before session 19: AttributeError "'dict' object has no attribute
    'mode'"; sessions 19-28 refused the mapping too). ``generate`` and ``warm_up`` take mappings among
    their configs."""
    engine = make_engine(model)
    for config in ("nap", 3, [("steps", 3)]):
        with pytest.raises(ConfigError, match="config must be a GenerationConfig, a mapping of settings or None"):
            engine.add("c", QUESTIONS[0], config, **TINY)
    with pytest.raises(ConfigError, match="given both in config and as keyword arguments"):
        engine.add("c", QUESTIONS[0], {"blocks": 1}, **TINY)
    assert not engine.has_unfinished() and not engine.ids
    settings = dict(TINY, tokens_per_step=2)
    engine.add("mapped", QUESTIONS[0], settings)
    engine.add("mixed", QUESTIONS[1], {"blocks": 1, "tokens_per_step": 2}, block_len=4, summary_len=3)
    done = drain(engine)
    for name, prompt in (("mapped", QUESTIONS[0]), ("mixed", QUESTIONS[1])):
        assert_same(done[name], solo(model, prompt, settings))
    results = engine.generate(QUESTIONS[2:4], [settings, GenerationConfig(**TINY)])
    assert_same(results[0], solo(model, QUESTIONS[2], settings))
    assert_same(results[1], solo(model, QUESTIONS[3], TINY))
    assert engine.warm_up([settings]) == 0


def test_warm_up_checks_its_configs_on_every_device(model):
    """A config warm_up cannot use is refused on a CPU too (before session 19: with no graphs to capture it
    returns 0 before looking at them, so a deployment script checked on a CPU fails on the GPU)."""
    engine = make_engine(model)
    assert engine.warm_up([None, GenerationConfig(**TINY)]) == 0
    for configs in ([{"steps": -3}], ["nap"]):
        with pytest.raises(ConfigError, match="config|steps"):
            engine.warm_up(configs)


def test_warm_up_refuses_configs_its_rows_cannot_decode_by_name(model):
    """A config add() would refuse for this engine's rows (a canvas past max_canvas_tokens, more
    blocks than max_blocks, the other kernel mode) is refused by warm_up too, naming the bound,
    on every device (before: accepted, and on a GPU graphs captured that no request can use)."""
    engine = make_engine(model, max_blocks=2)
    for overrides, named in ((dict(TINY, block_len=256), "max_canvas_tokens"), (dict(TINY, blocks=3), "max_blocks")):
        with pytest.raises((ConfigError, InputError), match=named):
            engine.add("r", QUESTIONS[0], **overrides)
        with pytest.raises((ConfigError, InputError), match=named):
            engine.warm_up([GenerationConfig(**TINY), GenerationConfig(**overrides)])
    other = make_engine(model, batch_invariant=False)
    with pytest.raises(ConfigError, match="batch_invariant"):
        other.warm_up([GenerationConfig(**TINY, batch_invariant=True)])
    assert engine.warm_up([GenerationConfig(**TINY), GenerationConfig(**dict(TINY, blocks=2))]) == 0
    assert not engine.has_unfinished() and not engine.ids


@pytest.mark.parametrize("configs", [GenerationConfig(**TINY), "nap", {"steps": 3}, 3, None],
                         ids=["one-config", "str", "dict", "int", "None"])
def test_configs_that_are_not_an_iterable_of_configs_are_refused_by_name(model, configs):
    """``generate(prompts, configs)`` and ``warm_up(configs)`` take an iterable of configs: one config (as
    ``paradec.generate`` takes it), a string, a mapping or a number is refused naming ``configs``, nothing
    queued (before: TypeError "'GenerationConfig' object is not iterable", or a string's letters counted
    as configs: "3 for 1 prompts")."""
    engine = make_engine(model)
    if configs is not None:  # (generate's default: the model's settings for every prompt)
        with pytest.raises(ConfigError, match="configs must be an iterable"):
            engine.generate(QUESTIONS[:1], configs, **TINY)
    with pytest.raises(ConfigError, match="configs must be an iterable"):
        engine.warm_up(configs)
    assert not engine.has_unfinished() and not engine.ids


# --- abort -----------------------------------------------------------------------------------------
def test_abort_unknown_twice_finished_and_from_inside_the_outputs(model):
    """abort: False for an unknown id (any type), for a second abort and for a finished request;
    aborting requests (itself, another live one, a waiting one) while iterating a step's outputs
    is safe; the rest decode as alone, and aborting everything leaves an idle engine."""
    engine = make_engine(model, max_batch=3)
    for i in range(5):
        engine.add(f"r{i}", QUESTIONS[i], stream=True, **SMALL)  # r3, r4 wait
    assert engine.abort("nobody") is False and engine.abort(None) is False and engine.abort(["r0"]) is False
    for _ in range(2):
        engine.step()
    seen = []
    for out in engine.step():
        seen.append(out.request_id)
        if out.request_id == "r1":
            assert engine.abort("r1") is True  # itself
            assert engine.abort("r2") is True  # another live row (the last: nothing moves)
            assert engine.abort("r3") is True  # waiting
            assert engine.abort("r1") is False and engine.abort("r3") is False
    assert seen == ["r0", "r1", "r2"]
    assert [s.request_id for s in engine.live] == ["r0"] and [s.request_id for s in engine.waiting] == ["r4"]
    results = drain(engine)
    assert set(results) == {"r0", "r4"}
    assert_same(results["r0"], solo(model, QUESTIONS[0], SMALL))
    assert_same(results["r4"], solo(model, QUESTIONS[4], SMALL))
    assert engine.abort("r0") is False  # finished
    for i in range(3):
        engine.add(f"x{i}", QUESTIONS[i], **TINY)
    engine.step()
    assert [engine.abort(f"x{i}") for i in (1, 0, 2)] == [True, True, True]
    assert engine.step() == [] and not engine.has_unfinished() and not engine.ids and not engine.live


def test_abort_mid_chunked_prefill_beside_a_decoding_request(model):
    """A long prompt aborted between its layer chunks while another request decodes and a third
    waits for the prefill budget: the others decode as alone."""
    engine = make_engine(model, max_batch=3, max_prefill_tokens=6)
    engine.add("first", QUESTIONS[0], GenerationConfig(**TINY, attention="canvas"))
    engine.step()
    long = engine.add("long", QUESTIONS[1] + " " + QUESTIONS[2], GenerationConfig(**TINY))
    engine.add("short", QUESTIONS[3], GenerationConfig(**TINY))
    engine.step()
    assert 0 < long.prefill_layer < len(model.module.layers)
    assert engine.abort("long") and long.row == -1 and engine.abort("long") is False
    results = drain(engine)
    assert set(results) == {"first", "short"}
    assert_same(results["first"], solo(model, QUESTIONS[0], dict(TINY, attention="canvas")))
    assert_same(results["short"], solo(model, QUESTIONS[3], TINY))


# --- a step that raises, generate() misused -------------------------------------------------------
def _raise_once(monkeypatch, obj, name):
    real, hits = getattr(obj, name), []

    def broken(*args, **kwargs):
        if not hits:
            hits.append(name)
            raise RuntimeError(f"device fault in {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, broken)
    return hits


@pytest.mark.parametrize("method,kwargs,engine_kwargs", [
    ("commit", SMALL, {}),
    ("forward_rows", dict(SMALL, window=4, cache="dual"), {}),
    ("prefill_layers", SMALL, dict(max_prefill_tokens=6)),
    ("end", SMALL, {}),
])
def test_a_call_that_raises_once_drops_only_the_live_requests(model, monkeypatch, method, kwargs, engine_kwargs):
    engine = make_engine(model, max_batch=2, **engine_kwargs)
    hits = _raise_once(monkeypatch, engine.calls, method)
    for i, rid in enumerate("abc"):
        engine.add(rid, QUESTIONS[i], **kwargs)
    results, errors, dropped = {}, 0, set()
    for _ in range(500):
        if not engine.has_unfinished():
            break
        before = set(engine.ids)
        try:
            results |= {o.request_id: o.result for o in engine.step() if o.finished}
        except RuntimeError as e:
            assert method in str(e)
            errors += 1
            dropped = before - engine.ids  # the live ones: their ids are free
            assert not engine.live and {s.request_id for s in engine.waiting} == engine.ids
    assert hits and errors == 1 and dropped
    engine.add("d", QUESTIONS[3], **kwargs)
    drain(engine, results)
    assert set(results) == ({"a", "b", "c", "d"} - set(dropped))
    for i, rid in enumerate("abcd"):
        if rid in results:
            assert_same(results[rid], solo(model, QUESTIONS[i], kwargs), rid)


def test_engine_generate_leaves_nothing_queued_when_a_step_raises(model, monkeypatch):
    """``generate`` owns the requests it adds: if a step raises (or the caller is interrupted)
    they are all gone and the engine is idle for the next call (before session 19: those still waiting stay
    queued under generate-made ids, and every later ``generate`` raises "runs on an idle engine")."""
    engine = make_engine(model, max_batch=2)
    _raise_once(monkeypatch, engine.calls, "commit")
    with pytest.raises(RuntimeError, match="device fault"):
        engine.generate(QUESTIONS[:3], **TINY)
    assert not engine.has_unfinished() and not engine.ids
    [again] = engine.generate(QUESTIONS[3:4], **TINY)
    assert_same(again, solo(model, QUESTIONS[3], TINY))


def test_engine_generate_takes_one_string_as_one_prompt(model):
    """``generate("...")``: one prompt, as ``paradec.generate`` takes it, or a refusal (before session 19: the
    string is iterated, and each character decodes as a prompt of its own)."""
    engine = make_engine(model, max_batch=2)
    try:
        results = engine.generate("12", **TINY)
    except InputError:
        assert not engine.has_unfinished()
        return
    assert len(results) == 1
    assert_same(results[0], solo(model, "12", TINY))


def test_idle_step_warm_up_and_generate_on_a_busy_engine(model):
    engine = make_engine(model, max_batch=2)
    assert engine.step() == [] and engine.step() == [] and not engine.has_unfinished()
    assert engine.stats.step_calls == 0 and not any(engine.stats.forwarded.values())  # nothing forwarded
    engine.add("busy", QUESTIONS[0], **TINY)
    with pytest.raises(ConfigError, match="idle engine"):
        engine.warm_up()
    with pytest.raises(ConfigError, match="idle engine"):
        engine.generate(QUESTIONS[1:2], **TINY)
    assert state(engine) == (["busy"], [], {"busy"})
    assert_same(drain(engine)["busy"], solo(model, QUESTIONS[0], TINY))
    assert engine.generate([]) == [] and not engine.has_unfinished()


# --- AsyncBatchEngine -----------------------------------------------------------------------------
async def _collect(streams: AsyncBatchEngine, prompt, **kwargs):
    return [out async for out in streams.generate(prompt, **kwargs)]


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_async_break_frees_the_id_for_the_next_call_at_once(model):
    """``break`` out of ``async for`` aborts the request as the stream is dropped, so the next call
    with its id (no await between) waits for that abort and decodes as alone (before: "request id
    'b' is already in use" until the loop closed the generator); a stream dropped while a read of it
    is pending aborts its request and the read hears RequestAborted; one closed with aclose() aborts
    too."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def main():
        async for _ in streams.generate(QUESTIONS[0], request_id="b", **SMALL):
            break
        again = [out async for out in streams.generate(QUESTIONS[1], request_id="b", **SMALL)]
        stream = streams.generate(QUESTIONS[2], request_id="d", **SMALL)
        streams._lock.acquire()  # its add waits for the lock: the read stays pending
        try:
            pending = asyncio.ensure_future(stream.__anext__())
            await _until(lambda: "d" in streams._queues)
            del stream
        finally:
            streams._lock.release()
        with pytest.raises(RequestAborted, match="'d'"):
            await asyncio.wait_for(pending, 10)
        closed = streams.generate(QUESTIONS[3], request_id="e", **SMALL)
        await closed.__anext__()
        await closed.aclose()
        await _until(lambda: not streams.engine.has_unfinished())
        return again

    again = asyncio.run(asyncio.wait_for(main(), 60))
    assert_same(again[-1].result, solo(model, QUESTIONS[1], SMALL))
    assert not streams.engine.ids and not streams._queues


def test_async_consumer_that_lags_holds_the_newest_progress_not_a_backlog(model):
    """A consumer that stops reading while its request decodes: the stream keeps one unread
    progress output (the newest: progress is cumulative), then the final one; what it reads on
    is in step order and ends in generate()'s result; a consumer that keeps up reads on as before."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def main():
        stream = streams.generate(QUESTIONS[5], request_id="slow", **SMALL)
        first = await stream.__anext__()
        await asyncio.wait_for(_until(lambda: not streams.engine.has_unfinished()), 30)
        held = [out async for out in stream]
        prompt = await _collect(streams, QUESTIONS[6], **SMALL)
        return first, held, prompt

    first, held, prompt = asyncio.run(main())
    alone = solo(model, QUESTIONS[5], SMALL)
    assert alone.steps > 3 and [o.finished for o in held] == [False, True]  # many steps passed unread
    assert first.step < held[0].step < alone.steps and held[0].committed <= held[0].lengths
    assert_same(held[-1].result, alone)
    steps = [o.step for o in prompt]
    assert steps == sorted(steps) and len(prompt) > 3 and prompt[-1].finished
    assert_same(prompt[-1].result, solo(model, QUESTIONS[6], SMALL))


def test_async_break_cancel_and_unknown_abort_free_their_rows(model):
    """A consumer that breaks off (its stream dropped) or whose task is cancelled while it waits
    for a row aborts its request; aborting an unknown id is False and touches nothing; the other
    stream finishes as alone."""
    engine = make_engine(model, max_batch=1)
    streams = AsyncBatchEngine(engine)

    async def break_off():
        async for _ in streams.generate(QUESTIONS[0], request_id="left", **SMALL):
            break

    async def waits_then_cancelled():
        async for _ in streams.generate(QUESTIONS[1], request_id="cancelled", **SMALL):
            pass

    async def main():
        await asyncio.wait_for(break_off(), 30)
        await asyncio.wait_for(_until(lambda: "left" not in engine.ids), 10)
        keeper = asyncio.ensure_future(_collect(streams, QUESTIONS[2], request_id="keeper", **SMALL))
        await asyncio.wait_for(_until(lambda: "keeper" in engine.ids), 10)
        task = asyncio.ensure_future(waits_then_cancelled())
        await asyncio.wait_for(_until(lambda: "cancelled" in engine.ids), 10)
        assert await streams.abort("nobody") is False
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # (aborted at once, or in a thread where the cancel came as the add landed)
        await asyncio.wait_for(_until(lambda: "cancelled" not in engine.ids and not engine.waiting), 10)
        outputs = await asyncio.wait_for(keeper, 30)
        assert not engine.has_unfinished() and not streams._queues
        return outputs[-1].result

    assert_same(asyncio.run(main()), solo(model, QUESTIONS[2], SMALL))


def test_async_same_id_twice_at_once_and_bad_requests_spare_the_others(model):
    """Two concurrent streams with one id: exactly one is refused (InputError), the other decodes
    as alone; bad requests raise before any output while other streams go on to their results."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))
    long_prompt = [7] * 65  # past max_prompt_tokens=64
    bad = [(QUESTIONS[0], dict(SMALL, policy="threshold", threshold=2), ConfigError),
           (QUESTIONS[0], dict(SMALL, bogus=1), ConfigError), ("  ", SMALL, InputError),
           (long_prompt, SMALL, InputError), (QUESTIONS[0], dict(SMALL, request_id=""), InputError)]

    async def main():
        twins = await asyncio.wait_for(asyncio.gather(
            *(_collect(streams, QUESTIONS[3], request_id="twin", **SMALL) for _ in range(2)),
            return_exceptions=True), 30)
        refused = [t for t in twins if isinstance(t, BaseException)]
        assert len(refused) == 1 and isinstance(refused[0], InputError) and "twin" in str(refused[0])
        done = next(t for t in twins if not isinstance(t, BaseException))
        others = [asyncio.ensure_future(_collect(streams, QUESTIONS[4 + i], **SMALL)) for i in range(3)]
        await asyncio.sleep(0)
        for prompt, kwargs, error in bad:
            with pytest.raises(error):
                await asyncio.wait_for(anext(streams.generate(prompt, **kwargs)), 10)
        results = await asyncio.wait_for(asyncio.gather(*others), 60)
        assert not streams.engine.has_unfinished() and not streams._queues
        return done[-1].result, [r[-1].result for r in results]

    twin, others = asyncio.run(main())
    assert_same(twin, solo(model, QUESTIONS[3], SMALL))
    for i, result in enumerate(others):
        assert_same(result, solo(model, QUESTIONS[4 + i], SMALL))


def test_async_a_huge_seed_is_refused_and_the_other_streams_finish(model):
    """(before session 19: seed=2**63 is accepted; the step admitting it raises ValueError into every stream,
    and the requests decoding beside it are lost.)"""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def main():
        others = [asyncio.ensure_future(_collect(streams, QUESTIONS[i], **TINY)) for i in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ConfigError, match="seed"):
            await asyncio.wait_for(anext(streams.generate(QUESTIONS[5], **TINY, seed=2**63)), 10)
        return await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 30)

    results = asyncio.run(main())
    for i, outputs in enumerate(results):
        assert not isinstance(outputs, BaseException), outputs
        assert_same(outputs[-1].result, solo(model, QUESTIONS[i], TINY))


def test_async_stream_keyword_is_refused_by_name(model):
    """Every async request streams: ``stream=`` is refused by name (before session 19: TypeError
    "to_thread() got multiple values for keyword argument 'stream'")."""
    streams = AsyncBatchEngine(make_engine(model))

    async def main():
        for value in (False, True):
            with pytest.raises((InputError, ConfigError), match="stream"):
                await asyncio.wait_for(anext(streams.generate(QUESTIONS[0], stream=value, **TINY)), 10)
        assert not streams.engine.has_unfinished() and not streams._queues

    asyncio.run(main())


def test_async_generated_ids_never_collide_with_given_ones(model):
    """A stream without a request_id gets a fresh one (before session 19: ids are "async-<n>" from a counter,
    refused as "already in use" when a caller chose that name)."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def main():
        n = next(stream_module._IDS)
        mine = streams.generate(QUESTIONS[0], request_id=f"async-{n + 1}", **TINY)
        await asyncio.wait_for(anext(mine), 10)
        auto = await asyncio.wait_for(_collect(streams, QUESTIONS[1], **TINY), 30)
        rest = await asyncio.wait_for(_collect_rest(mine), 30)
        return auto, rest

    auto, rest = asyncio.run(main())
    assert auto[-1].request_id != rest[-1].request_id
    assert_same(auto[-1].result, solo(model, QUESTIONS[1], TINY))
    assert_same(rest[-1].result, solo(model, QUESTIONS[0], TINY))


async def _collect_rest(stream):
    return [out async for out in stream]


def test_async_abort_of_a_finished_request_keeps_its_result(model):
    """``abort`` of a request the engine already finished returns False and must not take the
    unread result away (before session 19: the queued final output is dropped and the consumer gets
    RequestAborted although abort said it knew no such request)."""
    streams = AsyncBatchEngine(make_engine(model))

    async def main():
        stream = streams.generate(QUESTIONS[0], request_id="done", **TINY)
        first = await asyncio.wait_for(anext(stream), 10)
        await asyncio.wait_for(_until(lambda: not streams.engine.has_unfinished()), 10)
        assert await streams.abort("done") is False
        rest = await asyncio.wait_for(_collect_rest(stream), 10)
        return [first] + rest

    outputs = asyncio.run(main())
    assert outputs[-1].finished
    assert_same(outputs[-1].result, solo(model, QUESTIONS[0], TINY))


def test_async_a_step_error_reaches_only_the_requests_it_dropped(model, monkeypatch):
    """A step that raises drops the live requests (their consumers get the error); a request
    still waiting for a row was not part of it and decodes on, as alone (before session 19: the stepper puts
    the error into every queue and stops, so waiting requests fail too)."""
    engine = make_engine(model, max_batch=2)
    streams = AsyncBatchEngine(engine)
    real, seen = engine.calls.commit, {}

    def broken(*args, **kwargs):  # the first commit while one request waits for a row
        if not seen and engine.waiting:
            seen["live"] = {s.request_id for s in engine.live}
            seen["waiting"] = {s.request_id for s in engine.waiting}
            raise RuntimeError("device fault in commit")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.calls, "commit", broken)

    async def one(i):
        try:
            return await _collect(streams, QUESTIONS[i], request_id=f"r{i}", **TINY)
        except RuntimeError as e:
            return e

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(3))), 30)

    results = asyncio.run(main())
    assert seen, "no commit ran while a request waited"
    failed = {f"r{i}" for i, r in enumerate(results) if isinstance(r, RuntimeError)}
    assert failed == seen["live"], (failed, seen)
    for i, outputs in enumerate(results):
        if f"r{i}" in seen["waiting"]:
            assert_same(outputs[-1].result, solo(model, QUESTIONS[i], TINY))
    assert not engine.has_unfinished() and not streams._queues


def test_async_engine_works_after_a_step_error(model, monkeypatch):
    engine = make_engine(model, max_batch=2)
    streams = AsyncBatchEngine(engine)
    _raise_once(monkeypatch, engine.calls, "step_logits")

    async def main():
        with pytest.raises(RuntimeError, match="device fault"):
            await asyncio.wait_for(_collect(streams, QUESTIONS[0], **TINY), 30)
        await asyncio.wait_for(_until(lambda: not engine.has_unfinished()), 10)
        return await asyncio.wait_for(asyncio.gather(*(_collect(streams, QUESTIONS[i], **TINY)
                                                       for i in range(1, 4))), 30)

    for i, outputs in enumerate(asyncio.run(main()), 1):
        assert_same(outputs[-1].result, solo(model, QUESTIONS[i], TINY))
    assert not engine.ids


def test_async_many_streams_through_two_rows_equal_solo(model):
    """20 concurrent streams of mixed settings through max_batch=2: each equals generate() alone
    (token ids, trace, steps), its progress outputs end in one finished output."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))
    settings = [TINY, dict(TINY, temperature=0.7, seed=3), dict(mode="block", answer_len=6, block_len=3),
                dict(TINY, policy="threshold", threshold=0.8)]
    plan = [(QUESTIONS[i], settings[i % len(settings)]) for i in range(20)]

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(_collect(streams, p, **kw) for p, kw in plan)), 60)

    for (prompt, kwargs), outputs in zip(plan, asyncio.run(main())):
        assert [o.finished for o in outputs] == [False] * (len(outputs) - 1) + [True]
        assert_same(outputs[-1].result, solo(model, prompt, kwargs), (prompt, kwargs))
    assert not streams.engine.has_unfinished() and not streams._queues


def test_async_back_to_back_short_requests_never_hang(model):
    """Short requests one after another (each arriving as the stepper finishes the last one's
    final step), some pairs started a tick apart: every one finishes within its timeout."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))
    kwargs = dict(blocks=1, block_len=2, summary_len=2)

    async def main():
        finished = 0
        for i in range(30):
            if i % 3 == 0:
                later = asyncio.ensure_future(_collect(streams, QUESTIONS[(i + 1) % 20], **kwargs))
                outputs = await asyncio.wait_for(_collect(streams, QUESTIONS[i % 20], **kwargs), 10)
                finished += (await asyncio.wait_for(later, 10))[-1].finished
            else:
                outputs = await asyncio.wait_for(_collect(streams, QUESTIONS[i % 20], **kwargs), 10)
            finished += outputs[-1].finished
            if i % 5 == 4:
                await asyncio.sleep(0)  # and once in a while, with the stepper's task left to end
        return finished

    assert asyncio.run(main()) == 40
    assert not streams.engine.has_unfinished() and not streams._queues
    assert streams._stepper is None or streams._stepper.done()


def test_async_aborted_stream_hears_request_aborted_and_the_id_is_free(model):
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def main():
        stream = streams.generate(QUESTIONS[0], request_id="victim", **SMALL)
        await asyncio.wait_for(anext(stream), 10)
        assert await streams.abort("victim") is True
        with pytest.raises(RequestAborted):
            await asyncio.wait_for(anext(stream), 10)
        assert await streams.abort("victim") is False
        return await asyncio.wait_for(_collect(streams, QUESTIONS[1], request_id="victim", **TINY), 30)

    outputs = asyncio.run(main())
    assert_same(outputs[-1].result, solo(model, QUESTIONS[1], TINY))


def test_async_an_id_is_free_once_its_result_is_out(model):
    """A consumer that returns from inside ``async for`` on the final output (the stream not yet
    closed) may reuse the request's id at once (before: "already in use" until the loop's
    finaliser closed the stream)."""
    streams = AsyncBatchEngine(make_engine(model, max_batch=2))

    async def first_result(prompt):
        async for out in streams.generate(prompt, request_id="x", **TINY):
            if out.finished:
                return out.result

    async def main():  # (no wait_for around each: its task's extra loop turns would close the stream)
        return [await first_result(QUESTIONS[i]) for i in (0, 1)]

    for i, result in enumerate(asyncio.run(asyncio.wait_for(main(), 60))):
        assert_same(result, solo(model, QUESTIONS[i], TINY))


def test_async_a_stream_left_as_its_loop_ends_is_aborted_at_once(model):
    """Where the loop's executor is already shut down, the abort of a stream left early runs at
    once: nothing is left pending, so a later request with its id does not wait forever."""
    engine = make_engine(model, max_batch=2)
    streams = AsyncBatchEngine(engine)

    async def main():
        stream = streams.generate(QUESTIONS[0], request_id="x", **SMALL)
        await asyncio.wait_for(anext(stream), 10)
        loop = asyncio.get_running_loop()

        def shut(*args):
            raise RuntimeError("Executor shutdown has been called")

        loop.run_in_executor = shut  # (an instance attribute: this loop only)
        await stream.aclose()
        del loop.run_in_executor
        assert "x" not in engine.ids and not streams._aborting
        return await asyncio.wait_for(_collect(streams, QUESTIONS[1], request_id="x", **TINY), 30)

    outputs = asyncio.run(main())
    assert_same(outputs[-1].result, solo(model, QUESTIONS[1], TINY))


@pytest.mark.parametrize("ended_by", ["abort", "step error"])
def test_async_an_id_taken_again_survives_its_old_consumer(model, monkeypatch, ended_by):
    """A request ended by ``abort`` or by a step that raised frees its id at once; a new request
    may take it before the old consumer has read why its stream ended. That consumer's leaving
    then stops nothing (before: it aborted by id, so the new request, and its stream hung)."""
    engine = make_engine(model, max_batch=2)
    streams = AsyncBatchEngine(engine)
    if ended_by == "step error":
        seen = _raise_once(monkeypatch, engine.calls, "step_logits")
        seen.append("armed later")  # (armed once the old stream has its first output)

    async def main():
        old = streams.generate(QUESTIONS[0], request_id="x", **SMALL)
        await asyncio.wait_for(anext(old), 10)  # a consumer busy with its output as its request ends
        if ended_by == "abort":
            assert await streams.abort("x") is True
        else:
            seen.clear()
            await asyncio.wait_for(_until(lambda: "x" not in engine.ids), 10)
        new = asyncio.ensure_future(_collect(streams, QUESTIONS[1], request_id="x", **TINY))
        await asyncio.wait_for(_until(lambda: "x" in engine.ids), 10)
        with pytest.raises((RequestAborted, RuntimeError)):
            while True:
                await asyncio.wait_for(anext(old), 10)
        await old.aclose()
        return await asyncio.wait_for(new, 30)

    outputs = asyncio.run(main())
    assert_same(outputs[-1].result, solo(model, QUESTIONS[1], TINY))
    assert not engine.ids and not streams._queues and not streams._aborting


def test_async_a_consumer_leaving_during_a_long_step_does_not_block_the_loop(model, monkeypatch):
    """Its request is aborted in a thread (the step holds the engine's lock): other coroutines
    run on meanwhile (before: the loop stood still until the step ended), and a new request with
    its id waits for that abort, then decodes as alone."""
    engine = make_engine(model, max_batch=2)
    streams = AsyncBatchEngine(engine)
    real_step = engine.step

    def long_step():
        time.sleep(0.8)  # a big model's long step
        return real_step()

    monkeypatch.setattr(engine, "step", long_step)

    async def main():
        async def consume():
            async for _ in streams.generate(QUESTIONS[0], request_id="x", **SMALL):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.wait_for(_until(lambda: "x" in engine.ids and engine.live), 10)
        await asyncio.sleep(0.2)  # inside a step
        lags = []

        async def ticker():
            while True:
                start = time.perf_counter()
                await asyncio.sleep(0.01)
                lags.append(time.perf_counter() - start)

        tick = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.02)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        new = await asyncio.wait_for(_collect(streams, QUESTIONS[1], request_id="x", **TINY), 30)
        tick.cancel()
        return new, max(lags)

    outputs, lag = asyncio.run(main())
    assert lag < 0.4, f"the event loop stood still {lag:.2f} s"
    assert_same(outputs[-1].result, solo(model, QUESTIONS[1], TINY))
    assert not engine.ids and not streams._aborting


def test_async_an_unusable_id_and_an_abort_during_a_refused_add(model):
    """A stream's request id that is not a non-empty string is refused by name (not a TypeError
    from a lookup), and an abort that lands while an add is being refused leaves nothing behind:
    the same id decodes afterwards."""
    streams = AsyncBatchEngine(make_engine(model))
    engine = streams.engine

    async def main():
        for bad in (["a"], 3, ""):
            with pytest.raises(InputError, match="request_id"):
                await asyncio.wait_for(anext(streams.generate(QUESTIONS[0], request_id=bad, **TINY)), 10)
        add, started = engine.add, asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow_refusal(*args, **kwargs):
            loop.call_soon_threadsafe(started.set)
            time.sleep(0.2)
            raise InputError("refused")

        engine.add = slow_refusal
        refused = asyncio.ensure_future(anext(streams.generate(QUESTIONS[0], request_id="x", **TINY)))
        await started.wait()
        assert await streams.abort("x")  # it may still be added: aborted as it lands
        with pytest.raises(InputError, match="refused"):
            await asyncio.wait_for(refused, 10)
        # again, with the abort's answer arriving after the refusal has ended the add (a loaded
        # machine's order, where the abort once answered False for a request it saw being added)
        abort = engine.abort

        def slow_abort(request_id):
            known = abort(request_id)
            time.sleep(0.3)
            return known

        started.clear()
        engine.abort = slow_abort
        refused = asyncio.ensure_future(anext(streams.generate(QUESTIONS[0], request_id="x", **TINY)))
        await started.wait()
        assert await streams.abort("x")
        with pytest.raises(InputError, match="refused"):
            await asyncio.wait_for(refused, 10)
        engine.add, engine.abort = add, abort
        outputs = [out async for out in streams.generate(QUESTIONS[0], request_id="x", **TINY)]
        assert outputs[-1].finished and not streams._doomed and not engine.has_unfinished()
        return outputs[-1].result

    assert_same(asyncio.run(asyncio.wait_for(main(), 120)), solo(model, QUESTIONS[0], TINY))


def test_async_abort_that_looks_before_the_add_lands_still_stops_it(model):
    """The engine's abort may run before a request's add takes the engine (both wait on its
    lock) and answer after the add has landed: the abort still stops the request and answers
    True (it once answered False and left the request decoding to the end)."""
    import threading

    streams = AsyncBatchEngine(make_engine(model))
    engine, locked = streams.engine, streams._locked
    looked, answered = threading.Event(), threading.Event()
    step = engine.step

    def ordered(call, *args, **kwargs):
        if call == engine.add:
            looked.wait(10)  # the add takes the engine after the abort has looked
        known = locked(call, *args, **kwargs)
        if call == engine.abort and not looked.is_set():
            looked.set()
            time.sleep(0.2)  # ... and the abort's answer reaches the loop after the add has landed
            answered.set()
        return known

    def held_step():  # no step before that answer: the request cannot finish meanwhile
        answered.wait(10)
        return step()

    streams._locked, engine.step = ordered, held_step
    long = dict(blocks=2, block_len=16, summary_len=8, tokens_per_step=1)  # 24 steps and more

    async def main():
        stream = streams.generate(QUESTIONS[0], request_id="x", **long)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the add is on its way
        assert await streams.abort("x")
        # a step's progress may reach the waiting consumer before the abort's second look takes
        # the engine (the step that held it ran first); after the answer, the stream only raises
        read = []
        with pytest.raises(RequestAborted):
            read.append(await asyncio.wait_for(first, 30))
            read.append(await asyncio.wait_for(anext(stream), 30))
        assert len(read) <= 1 and not any(output.finished for output in read)
        assert (engine.has_unfinished(), streams._doomed, streams._adding) == (False, set(), {})

    asyncio.run(asyncio.wait_for(main(), 120))


def test_async_an_id_whose_aborted_add_still_runs_is_in_use(model):
    """An abort answered mid-add frees the request's stream, but its add still runs: the same
    id is refused until that add has landed (a second request of it once took the first one's
    abort and was stopped), and then decodes as alone."""
    import threading

    streams = AsyncBatchEngine(make_engine(model))
    engine, locked, late, release = streams.engine, streams._locked, [True], threading.Event()

    def first_add_late(call, *args, **kwargs):
        if call == engine.add and late[0]:
            late[0] = False
            release.wait(10)  # the first add reaches the engine once the test lets it
        return locked(call, *args, **kwargs)

    streams._locked = first_add_late

    async def main():
        first = asyncio.ensure_future(anext(streams.generate(QUESTIONS[0], request_id="x", **TINY)))
        while "x" not in streams._adding:  # its add is on its way (held)
            await asyncio.sleep(0)
        assert await streams.abort("x")
        with pytest.raises(InputError, match="already in use"):
            await anext(streams.generate(QUESTIONS[1], request_id="x", **TINY))
        release.set()
        with pytest.raises(RequestAborted):
            await asyncio.wait_for(first, 30)
        assert not streams._doomed and not streams._adding
        outputs = [out async for out in streams.generate(QUESTIONS[1], request_id="x", **TINY)]
        return outputs[-1].result

    assert_same(asyncio.run(asyncio.wait_for(main(), 120)), solo(model, QUESTIONS[1], TINY))


def test_async_a_consumer_cancelled_as_its_add_lands_aborts_the_request(model):
    """A consumer cancelled after its request's add succeeded but before its ``generate`` saw
    that (the cancel in the same loop iteration as the add's end) aborts the request: it once
    stayed in the engine with no consumer and, with no stepper started, never left."""
    streams = AsyncBatchEngine(make_engine(model))
    engine = streams.engine

    async def consume():
        async for _ in streams.generate(QUESTIONS[0], request_id="late", **SMALL):
            pass

    async def main():
        task = asyncio.ensure_future(consume())
        while "late" not in streams._adding:  # its add is on its way
            await asyncio.sleep(0)
        streams._adding["late"].add_done_callback(lambda add: task.cancel())  # runs before generate resumes
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        await asyncio.wait_for(_until(lambda: "late" not in engine.ids and not engine.has_unfinished()), 10)
        assert not streams._queues and not streams._doomed and not streams._adding
        return await asyncio.wait_for(_collect(streams, QUESTIONS[0], request_id="late", **SMALL), 30)

    outputs = asyncio.run(main())
    assert_same(outputs[-1].result, solo(model, QUESTIONS[0], SMALL))
