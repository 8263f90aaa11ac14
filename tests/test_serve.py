"""Serving over real loopback sockets with the built-in model: the wire refuses what it must,
clients get exactly one final answer each (equal to a direct ``paradec.generate``), aborts and
vanished clients stop decoding, a dead engine is reported to everyone waiting, and the HTTP
endpoint speaks OpenAI's format."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import torch
import zmq

import paradec
from paradec.serve import AsyncClient, Client, EngineDead, Progress, ServedResult, ServeError
from paradec.serve.frontend import BackgroundFrontend, EngineTarget, check_bind
from paradec.errors import ConfigError
from paradec.serve.protocol import REQUEST_SETTINGS, Limits, MessageType, ProtocolError, decode, encode
from paradec.train.tasks import arith

from dist_worker import free_port

SMALL = {"blocks": 2, "tokens_per_step": 4}  # a short canvas: quick on the CPU
SLOW = {"blocks": 4, "tokens_per_step": 1}  # ~50 steps: time to abort or kill mid-decode
QUESTIONS = [p.question for p in arith.test_problems()[:50]]


def Server(token: str | None = None, max_pending: int = 64, max_batch: int = 8, limits: Limits = Limits(),
           nproc: int = 1, **options) -> BackgroundFrontend:
    """A frontend on a loopback port (its own event-loop thread), its engine in a spawned process."""
    target = EngineTarget("paradec-tiny", max_batch=max_batch, device="cpu", limits=limits, nproc=nproc)
    return BackgroundFrontend((f"tcp://127.0.0.1:{free_port()}", target),
                              dict(token=token, max_pending=max_pending, limits=limits, **options), start_timeout_s=120)


@pytest.fixture(scope="module")
def server():
    s = Server(max_batch=8)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny():
    return paradec.load("paradec-tiny")


def _raw(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _reply(sock: zmq.Socket, timeout_s: float = 20.0):
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return decode(sock.recv_multipart())


# --- the wire ---------------------------------------------------------------------------------


def test_protocol_round_trip_and_refusals():
    frames = encode(MessageType.OUTPUT, {"id": "x", "kind": "final", "result": {"a": 1}}, [[1, 2, 3], [-1, 0, 4]])
    message = decode(frames)
    assert message.type == MessageType.OUTPUT and [b.tolist() for b in message.buffers] == [[1, 2, 3], [-1, 0, 4]]
    bad = {
        "unknown message type": [b"\x09", msgpack.packb({"id": "a"})],
        "not valid msgpack": [b"\x01", b"\xc1"],
        "is a map": [b"\x01", msgpack.packb([1, 2])],
        "unknown fields": [b"\x01", msgpack.packb({"id": "a", "prompt": "q", "pickle": b"x"})],
        "must be str": [b"\x01", msgpack.packb({"id": 7, "prompt": "q"})],
        "'stream' of a ADD message must be bool": [b"\x01", msgpack.packb({"id": "a", "prompt": "q", "stream": 1})],
        "exactly one of them": [b"\x01", msgpack.packb({"id": "a"})],
        "needs the field 'method'": [b"\x03", msgpack.packb({"id": "a"})],
        "whole int32": [b"\x01", msgpack.packb({"id": "a"}), b"abc"],
        "over the limit": [b"\x01", msgpack.packb({"id": "a", "prompt": "q" * 100})],
        "2 to 4 frames": [b"\x01"],
    }
    for expected, frames in bad.items():
        with pytest.raises(ProtocolError, match=expected):
            decode(frames, Limits(max_frame_bytes=64))
    with pytest.raises(ProtocolError, match="not loopback"):
        check_bind("tcp://0.0.0.0:5555", None)
    check_bind("tcp://0.0.0.0:5555", "secret")  # allowed with a token


def test_bad_messages_get_errors_and_the_server_stays_up(server):
    sock = _raw(server.address)
    cases = [
        ([b"\x01", b"\xc1"], "invalid"),  # malformed msgpack
        ([b"\x01", msgpack.packb({"id": "w", "prompt": 3})], "invalid"),  # wrong field type
        ([b"\x2a", msgpack.packb({"id": "u"})], "invalid"),  # unknown message type
        ([b"\x01", msgpack.packb({"id": "", "prompt": "hi"})], "invalid"),  # an empty id
        ([b"\x01", msgpack.packb({"id": "h", "prompt": "q ?", "config": {"block_len": 10**12}})], "too_large"),
        ([b"\x01", msgpack.packb({"id": "n", "prompt": "q ?", "config": {"blocks": 10**5}})], "too_large"),
        ([b"\x01", msgpack.packb({"id": "o2", "prompt": "q ?", "config": {"block_len": 2**63}})], "too_large"),
        ([b"\x04", msgpack.packb({"id": "o", "kind": "final"})], "invalid"),  # a server-only type
        ([b"\x01", msgpack.packb({"id": "c", "prompt": "q ?", "config": {"blocks": 0}})], "invalid"),  # bad config
        ([b"\x01", msgpack.packb({"id": "t", "prompt": "q ?", "config": {"threshold": "x"}})], "invalid"),  # wrong type
        ([b"\x01", msgpack.packb({"id": "k", "prompt": "q ?", "config": {"nonsense": 1}})], "invalid"),  # unknown
    ]
    for frames, code in cases:
        sock.send_multipart(frames)
        reply = _reply(sock)
        assert reply.type == MessageType.ERROR and reply.body["code"] == code, (frames[:1], reply.body)
    # a frame over the limit: ZeroMQ drops the sender's connection, the server goes on
    sock.send_multipart([b"\x01", msgpack.packb({"id": "big", "prompt": "x" * (2 << 20)})])
    assert not sock.poll(1000)
    sock.close()
    with Client(server.address, timeout_s=60) as client:
        assert client.health()["healthy"]
        assert client.generate(QUESTIONS[0], **SMALL).answer is not None


def test_token_required_and_checked():
    secret = "s3cret-s3cret-s3cret"  # a token has at least 16 characters
    s = Server(token=secret)
    try:
        with Client(s.address, timeout_s=30) as none, Client(s.address, token="wrong", timeout_s=30) as wrong, \
                Client(s.address, token="sécret-s3cret-s3cret", timeout_s=30) as accented:
            for client in (none, wrong, accented):
                with pytest.raises(ServeError, match="unauthorized"):
                    client.generate(QUESTIONS[0], **SMALL)
                with pytest.raises(ServeError, match="unauthorized"):
                    client.health()
        with Client(s.address, token=secret, timeout_s=60) as right:
            assert right.generate(QUESTIONS[0], **SMALL).answer is not None
    finally:
        s.stop()


# --- requests ---------------------------------------------------------------------------------


def test_result_equals_generate_and_progress_streams(server, tiny):
    events = []
    with Client(server.address, timeout_s=60) as client:
        result = client.generate(QUESTIONS[1], on_progress=events.append, **SMALL)
        ids = tiny.tokenizer(QUESTIONS[2], add_special_tokens=False)["input_ids"]
        from_ids = client.generate(ids, **SMALL)
    direct = paradec.generate(tiny, QUESTIONS[1], **SMALL)
    assert result.token_ids == direct.token_ids and result.trace == direct.trace and result.blocks == direct.blocks
    assert result.nfe == direct.nfe and result.summary == direct.summary
    assert from_ids.token_ids == paradec.generate(tiny, ids, **SMALL).token_ids
    assert events and all(isinstance(e, Progress) for e in events)
    assert [e.step for e in events] == sorted(e.step for e in events)
    assert all(len(e.committed) == 3 and all(c <= n for c, n in zip(e.committed, e.lengths)) for e in events)
    assert events[-1].committed[0] == events[-1].lengths[0]  # the think blocks filled in before the summary


def test_fifty_concurrent_clients_all_answered_as_generate_would(server, tiny):
    # every third request is sampled (from its own seed), the rest greedy: they share the batch
    # (blocks of 16: the fifty at once, not their length, are the point; ~26 -> ~12 s on 2 cores)
    short = dict(SMALL, block_len=16, summary_len=8)
    settings = [dict(short, temperature=0.8, seed=100 + i) if i % 3 == 0 else dict(short) for i in range(50)]

    def ask(i):
        with Client(server.address, timeout_s=300) as client:
            return client.generate(QUESTIONS[i], **settings[i])

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(50)))
    for i, result in enumerate(results):
        direct = paradec.generate(tiny, QUESTIONS[i], **settings[i])
        # the very run it gets alone: continuous batching keeps each request's own steps
        assert result.token_ids == direct.token_ids and result.summary == direct.summary, i
        assert result.trace == direct.trace and result.nfe == direct.nfe, i
    with Client(server.address) as client:
        stats = client.stats()
    assert stats["in_flight"] == 0 and stats["finished"] >= 50


# --- continuous batching: requests join and leave the running batch --------------------------------
# 32 steps (144 with blocks of 64), then 6 steps (sampled, another policy, 4 tokens a step)
LONG_16 = {"blocks": 2, "block_len": 16, "summary_len": 16, "tokens_per_step": 1, "eos_closes_block": False}
# 144 steps: still decoding after another request's whole decode, on a loaded machine too
LONG_64 = dict(LONG_16, block_len=64)
QUICK_16 = {"blocks": 2, "block_len": 16, "tokens_per_step": 4, "policy": "margin", "temperature": 0.7, "seed": 3}


def _timed(stream) -> list[tuple[float, object]]:
    """A stream's events, each with when it arrived."""
    return [(time.monotonic(), event) for event in stream]


def _same_run(result, direct) -> None:
    assert result.token_ids == direct.token_ids and result.trace == direct.trace and result.nfe == direct.nfe


def test_a_request_with_other_settings_joins_the_running_batch(server, tiny):
    joined: list = []
    with Client(server.address, timeout_s=120) as first, Client(server.address, timeout_s=120) as second:
        stream = first.stream(QUESTIONS[24], **LONG_64)
        assert isinstance(next(stream), Progress)  # the first is decoding
        sent = time.monotonic()
        thread = threading.Thread(target=lambda: joined.extend(_timed(second.stream(QUESTIONS[25], **QUICK_16))))
        thread.start()
        events = _timed(stream)
        thread.join(120)
    (a_done, a), (b_done, b) = events[-1], joined[-1]
    _same_run(a, paradec.generate(tiny, QUESTIONS[24], **LONG_64))
    _same_run(b, paradec.generate(tiny, QUESTIONS[25], **QUICK_16))  # sampled, another policy and step size
    b_started = min(t for t, e in joined if isinstance(e, Progress))
    assert sent < b_started < a_done  # the second decoded while the first did: it did not wait for it
    assert b_done < a_done  # and left first, the first still decoding (its progress went on meanwhile)
    assert any(isinstance(e, Progress) and b_done < t for t, e in events)
    assert b.engine_s["queued"] < a.engine_s["generate"]  # admitted at the next engine step


def test_an_abort_leaves_the_other_requests_of_the_batch_decoding(server, tiny):
    with Client(server.address, timeout_s=120) as doomed, Client(server.address, timeout_s=120) as other:
        gone = doomed.stream(QUESTIONS[26], **LONG_64)
        kept = other.stream(QUESTIONS[27], **dict(LONG_16, tokens_per_step=2, policy="entropy"))
        first = next(gone)
        assert isinstance(next(kept), Progress)  # both decoding
        doomed.abort(first.id)
        with pytest.raises(ServeError, match="aborted"):
            for _ in gone:
                pass
        rest = list(kept)
    assert isinstance(rest[-1], ServedResult) and any(isinstance(e, Progress) for e in rest[:-1])
    _same_run(rest[-1], paradec.generate(tiny, QUESTIONS[27], **dict(LONG_16, tokens_per_step=2, policy="entropy")))


def test_an_invalid_request_mid_batch_is_refused_alone(server, tiny):
    with Client(server.address, timeout_s=120) as running, Client(server.address, timeout_s=60) as bad:
        stream = running.stream(QUESTIONS[28], **LONG_16)
        assert isinstance(next(stream), Progress)
        with pytest.raises(ServeError, match="invalid: policy must be one of"):
            bad.generate(QUESTIONS[29], policy="no-such-policy", **SMALL)
        with pytest.raises(ServeError, match="invalid: .*max_blocks=16"):  # refused by the batching engine itself
            bad.generate(QUESTIONS[29], blocks=20, block_len=4)
        events = list(stream)
    assert any(isinstance(e, Progress) for e in events[:-1])  # still decoding after the refusals
    _same_run(events[-1], paradec.generate(tiny, QUESTIONS[28], **LONG_16))


def test_busy_when_the_table_is_full():
    s = Server(max_pending=1)
    try:
        with Client(s.address, timeout_s=120) as first, Client(s.address, timeout_s=30) as second:
            stream = first.stream(QUESTIONS[3], **SLOW)
            assert isinstance(next(stream), Progress)  # in flight now
            with pytest.raises(ServeError, match="busy"):
                second.generate(QUESTIONS[4], **SMALL)
            assert not isinstance(list(stream)[-1], Progress)  # the first still gets its result
            assert second.generate(QUESTIONS[4], **SMALL).answer is not None  # room again
    finally:
        s.stop()


def test_abort_mid_decode(server):
    with Client(server.address, timeout_s=120) as client:
        stream = client.stream(QUESTIONS[5], **SLOW)
        first = next(stream)
        assert isinstance(first, Progress)
        client.abort(first.id)
        with pytest.raises(ServeError, match="aborted"):
            for _ in stream:
                pass
        assert client.generate(QUESTIONS[6], **SMALL).answer is not None


def test_timeout_aborts_the_request(server):
    with Client(server.address) as client:
        with pytest.raises((ServeError, TimeoutError)):
            client.generate(QUESTIONS[7], timeout_s=0.05, **SLOW)
        assert client.health()["healthy"]


def test_client_that_disconnects_mid_stream(server):
    before = Client(server.address).stats()
    client = Client(server.address, timeout_s=120)
    stream = client.stream(QUESTIONS[8], **SLOW)
    assert isinstance(next(stream), Progress)
    client.close()  # gone mid-stream
    with Client(server.address, timeout_s=120) as other:
        assert other.generate(QUESTIONS[9], **SMALL).answer is not None
        deadline = time.monotonic() + 30
        while other.stats()["disconnected"] == before["disconnected"] and time.monotonic() < deadline:
            time.sleep(0.2)
        stats = other.stats()
    assert stats["disconnected"] == before["disconnected"] + 1 and stats["in_flight"] == 0


def test_async_client_runs_requests_at_once(server, tiny):
    async def main():
        client = AsyncClient(server.address, timeout_s=120)
        try:
            first = client.stream(QUESTIONS[15], request_id="same", **SMALL)
            await first.__anext__()  # in flight
            with pytest.raises(ServeError, match="already in flight"):
                await client.generate(QUESTIONS[15], request_id="same", **SMALL)
            await first.aclose()
            return await asyncio.gather(*(client.generate(q, **SMALL) for q in QUESTIONS[10:14]))
        finally:
            client.close()

    results = asyncio.run(main())
    for q, r in zip(QUESTIONS[10:14], results):
        assert r.token_ids == paradec.generate(tiny, q, **SMALL).token_ids


def test_a_config_sent_whole_carries_threshold_and_factor_only_under_their_policy():
    """A client's GenerationConfig crosses the wire whole, but a threshold or factor under another
    policy (its default, unused) is left out: the engine would refuse it as given explicitly."""
    from paradec.config import GenerationConfig
    from paradec.serve.client import request_body

    for config, overrides, sent in [(GenerationConfig(policy="confidence"), {}, set()),
                                    (GenerationConfig.build(None, threshold=0.8), {}, {"threshold"}),
                                    (GenerationConfig.build(None, factor=2.0), {}, {"factor"}),
                                    (GenerationConfig.build(None, threshold=0.8), {"policy": "margin"}, set()),
                                    (GenerationConfig.build(None, factor=2.0), {"threshold": 0.7}, {"threshold"})]:
        settings = request_body("a", "q", config, overrides, False, None, None)[0]["config"]
        assert {"threshold", "factor"} & set(settings) == sent
        # as the engine builds it: as the client's config with the overrides
        assert GenerationConfig.build(None, **settings) == GenerationConfig.build(config, **overrides)
    as_mapping = request_body("a", "q", {"blocks": 2}, {"seed": 3}, False, None, None)[0]["config"]
    assert as_mapping == {"blocks": 2, "seed": 3}  # a mapping as config: settings, as generate() takes it


def test_a_client_sends_the_config_generate_would_decode_with():
    """Overrides on a client's GenerationConfig are reconciled as ``generate()`` reconciles them
    (a setting the overrides turn off drops to its default, max_new_tokens follows the mode),
    so the engine, building the sent settings, gets generate()'s config; a mapping keeps
    generate()'s rules too (a name given twice refused; a whole dump's process settings at
    their defaults left out)."""
    from paradec.config import GenerationConfig
    from paradec.serve.client import request_body

    nap = GenerationConfig.build(None, blocks=2, tokens_per_step=4, max_new_tokens=4)
    for config, overrides in [(GenerationConfig.build(None, temperature=0.9, top_k=5), {"temperature": 0.0}),
                              (nap, {"mode": "ao"}), (nap, {"summary_len": 8}),
                              (GenerationConfig.build(None, policy="threshold", threshold=0.7), {"factor": 2.0}),
                              (GenerationConfig(cuda_graphs=False), {"seed": 4})]:
        settings = request_body("a", "q", config, overrides, False, None, None)[0]["config"]
        assert GenerationConfig.build(None, **settings) == GenerationConfig.build(config, **overrides)
        assert ("cuda_graphs" in settings) == (not config.cuda_graphs)  # a process setting: for the server to refuse
    with pytest.raises(ConfigError, match=r"\['seed'\] given both"):
        request_body("a", "q", {"seed": 1}, {"seed": 2}, False, None, None)
    with pytest.raises(ConfigError, match="unknown generation settings"):
        request_body("a", "q", nap, {"gen_length": 4}, False, None, None)
    dump = dataclasses.asdict(nap)
    settings = request_body("a", "q", dump, {}, False, None, None)[0]["config"]
    assert set(settings) <= REQUEST_SETTINGS and GenerationConfig.build(None, **settings) == nap
    assert request_body("a", "q", None, {"num_return_sequences": 2}, False, None, None)[0]["config"] == \
        {"num_return_sequences": 2}  # not at its default: sent, for the server to refuse by name


def test_a_client_sends_numpy_and_tensor_numbers_and_tuples_as_generate_takes_them(server, tiny):
    """Settings as LLaDA's and transformers' callers pass them to ``generate`` — numpy and 0-d tensor
    numbers, a tuple of stop strings, in overrides, a mapping or a GenerationConfig — decode as
    ``generate`` decodes them (before: ProtocolError "config.seed must be a number ...; got a int64")."""
    import numpy as np

    from paradec.config import GenerationConfig

    settings = dict(SMALL, seed=np.int64(3), temperature=torch.tensor(0.5), tokens_per_step=np.int32(2),
                    stop=("28", "20"))
    want = paradec.generate(tiny, QUESTIONS[4], **settings)
    with Client(server.address, timeout_s=120) as client:
        assert client.generate(QUESTIONS[4], **settings).token_ids == want.token_ids
        assert client.generate(QUESTIONS[4], dict(settings)).token_ids == want.token_ids
        whole = GenerationConfig.build(None, **settings)  # paradec's defaults under the settings, not the checkpoint's
        assert client.generate(QUESTIONS[4], whole).token_ids == paradec.generate(tiny, QUESTIONS[4], whole).token_ids


def test_accepted_comes_once_the_engine_queued_the_request_even_behind_full_rows(server, tiny):
    """``stream(accepted=True)``: an ``Accepted`` event first, sent when the engine queued the
    request (all 8 rows busy here, so before its first step), then its progress and result as
    without it; a refused request gets its error and no ``Accepted``."""
    from paradec.serve.client import Accepted

    async def main():
        client = AsyncClient(server.address, timeout_s=120)
        try:
            # ~130 steps each (aborted once the check is made): in flight however slowly a loaded machine steps
            busy = [client.stream(q, blocks=2, block_len=64, tokens_per_step=1, eos_closes_block=False)
                    for q in QUESTIONS[20:28]]
            for stream in busy:
                assert isinstance(await stream.__anext__(), Progress)  # every row decoding
            events = client.stream(QUESTIONS[28], accepted=True, **SMALL)
            first = await events.__anext__()
            in_flight = (await client.stats())["in_flight"]
            for stream in busy:  # aborted: their rows free up for it
                await stream.aclose()
            rest = [event async for event in events]
            refused = client.stream(QUESTIONS[29], accepted=True, blocks=2, block_len=4, threshold=2.0)
            with pytest.raises(ServeError, match="invalid"):
                await refused.__anext__()
            return first, in_flight, rest
        finally:
            client.close()

    first, in_flight, rest = asyncio.run(main())
    assert isinstance(first, Accepted) and in_flight == 9  # accepted while the 8 others still decode
    assert all(isinstance(e, Progress) for e in rest[:-1]) and rest[:-1]
    assert rest[-1].token_ids == paradec.generate(tiny, QUESTIONS[28], **SMALL).token_ids


def _settled(address: str, before: dict, aborted: int, timeout_s: float = 30.0) -> dict:
    """The server's stats once ``aborted`` more requests ended aborted and none is in flight."""
    deadline = time.monotonic() + timeout_s
    with Client(address) as client:
        while True:
            stats = client.stats()
            done = stats["aborted"] >= before["aborted"] + aborted and stats["in_flight"] == 0
            if done or time.monotonic() > deadline:
                return stats
            time.sleep(0.1)


def test_leaving_a_stream_early_aborts_it_and_its_id_answers_only_the_new_request(server, tiny):
    """A cancelled generate and a closed stream are aborted at the server; a reused request_id
    gets its own result (never the left request's), and one still in flight is refused locally."""
    expected = paradec.generate(tiny, QUESTIONS[31], **SMALL)

    async def main():
        client = AsyncClient(server.address, timeout_s=120)
        started = asyncio.Event()
        try:
            left = asyncio.ensure_future(client.generate(QUESTIONS[30], request_id="q", **SLOW,
                                                         on_progress=lambda _: started.set()))
            await asyncio.wait_for(started.wait(), 60)  # decoding
            left.cancel()
            await asyncio.gather(left, return_exceptions=True)
            reused = await client.generate(QUESTIONS[31], request_id="q", **SMALL)
            stream = client.stream(QUESTIONS[30], request_id="s", **SLOW)
            assert isinstance(await stream.__anext__(), Progress) and (await stream.__anext__()).id == "s"
            await stream.aclose()  # what `break` out of `async for` does (at once with aclose)
            aborted = client.stream(QUESTIONS[30], request_id="r", **SLOW)
            assert isinstance(await aborted.__anext__(), Progress)
            await client.abort("r")
            with pytest.raises(ServeError, match="already in flight"):  # its final has not come back yet
                await client.generate(QUESTIONS[31], request_id="r", **SMALL)
            with pytest.raises(ServeError, match="aborted"):
                async for _ in aborted:
                    pass
            return reused, await client.generate(QUESTIONS[31], request_id="r", **SMALL)
        finally:
            client.close()

    before = Client(server.address).stats()
    results = asyncio.run(main())
    for result in results:
        assert result.token_ids == expected.token_ids and result.id in ("q", "r")
    stats = _settled(server.address, before, aborted=3)
    assert stats["aborted"] == before["aborted"] + 3 and stats["in_flight"] == 0, (before, stats)


def test_async_client_request_id_is_free_once_its_result_is_returned(server, tiny):
    async def main():
        client = AsyncClient(server.address, timeout_s=120)
        try:  # the same name again at once, no loop turn between (before: "already in flight")
            return [await client.generate(QUESTIONS[i], request_id="same", **SMALL) for i in (35, 36)]
        finally:
            client.close()

    for i, result in zip((35, 36), asyncio.run(main())):
        assert result.id == "same" and result.token_ids == paradec.generate(tiny, QUESTIONS[i], **SMALL).token_ids


def test_a_blocking_client_that_leaves_a_stream_early_aborts_it(server):
    before = Client(server.address).stats()
    with Client(server.address, timeout_s=120) as client:
        for event in client.stream(QUESTIONS[32], **SLOW):
            assert isinstance(event, Progress)
            break  # the generator is closed here: its request is aborted
        stats = _settled(server.address, before, aborted=1)
        assert stats["aborted"] == before["aborted"] + 1 and stats["in_flight"] == 0, (before, stats)
        assert client.generate(QUESTIONS[33], **SMALL).answer is not None  # the left request's output is skipped


def test_async_client_works_from_one_event_loop_after_another(server):
    client = AsyncClient(server.address, timeout_s=60)
    try:
        for _ in range(2):  # asyncio.run per call: each loop ends, the next one takes the client over
            assert asyncio.run(client.health(timeout_s=5))["healthy"]
        assert asyncio.run(client.generate(QUESTIONS[34], **SMALL)).answer is not None
        kept = asyncio.new_event_loop()  # a loop that stays open keeps the client: a later loop is refused
        try:
            assert kept.run_until_complete(client.health(timeout_s=5))["healthy"]
            with pytest.raises(RuntimeError, match="another event loop that is still open"):
                asyncio.run(client.health(timeout_s=5))
        finally:
            kept.close()
        assert asyncio.run(client.health(timeout_s=5))["healthy"]  # once it is closed, it is not
    finally:
        client.close()


def test_engine_killed_mid_request():
    s = Server(restart=False)  # restarting: tests/test_serve_faults.py
    try:
        clients = [Client(s.address, timeout_s=120) for _ in range(3)]
        streams = [c.stream(q, **SLOW) for c, q in zip(clients, QUESTIONS[20:23])]
        assert isinstance(next(streams[0]), Progress)
        s.frontend.engine.kill()
        for stream in streams:
            with pytest.raises(EngineDead):
                for _ in stream:
                    pass
        with Client(s.address, timeout_s=10) as late:
            assert late.health()["healthy"] is False  # the frontend is up and says so
            with pytest.raises(EngineDead):
                late.generate(QUESTIONS[0], **SMALL)
        for c in clients:
            c.close()
    finally:
        s.stop()


def test_engine_of_two_ranks(tiny):
    s = Server(nproc=2)
    try:
        with Client(s.address, timeout_s=120) as client:
            events = list(client.stream(QUESTIONS[40], blocks=4, tokens_per_step=4))
            sampled = client.generate(QUESTIONS[41], blocks=3, tokens_per_step=2, temperature=0.9, seed=5)
            with pytest.raises(ServeError, match="isolated"):
                client.generate(QUESTIONS[42], attention="canvas", **SMALL)  # refused alike by both ranks
            assert client.generate(QUESTIONS[42], **SMALL).answer is not None  # and the ranks go on

        async def choices():  # sampled with seeds s, s + 1, s + 2 (an HTTP request's n = 3): they may batch
            together = AsyncClient(s.address, timeout_s=120)
            try:
                return await asyncio.gather(*(together.generate(QUESTIONS[43], temperature=0.9, seed=11 + j, **SMALL)
                                              for j in range(3)))
            finally:
                together.close()

        async def unspreadable():  # refused before any Accepted (an HTTP stream's 200 waits for it)
            client = AsyncClient(s.address, timeout_s=120)
            try:
                events = client.stream(QUESTIONS[44], accepted=True, mode="random", answer_len=16)
                with pytest.raises(ServeError, match="mode='random' has no think blocks to spread") as refused:
                    await events.__anext__()
                return refused.value.code
            finally:
                client.close()

        assert asyncio.run(unspreadable()) == "invalid"
        for j, result in enumerate(asyncio.run(choices())):
            alone = paradec.generate(tiny, QUESTIONS[43], temperature=0.9, seed=11 + j, **SMALL)
            assert (result.token_ids, result.trace) == (alone.token_ids, alone.trace)
        assert len(events) == 1  # no per-step progress across ranks: the result only
        direct = paradec.generate(tiny, QUESTIONS[40], blocks=4, tokens_per_step=4)
        assert events[0].token_ids == direct.token_ids and events[0].trace == direct.trace  # placement-free
        again = paradec.generate(tiny, QUESTIONS[41], blocks=3, tokens_per_step=2, temperature=0.9, seed=5)
        assert sampled.token_ids == again.token_ids
    finally:
        s.stop()


# --- HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def http(server):
    uvicorn = pytest.importorskip("uvicorn")
    from paradec.serve.http import create_app

    port = free_port()
    config = uvicorn.Config(create_app(server.address, timeout_s=120), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not web.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(10)


def _post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_openai_completions_and_chat(http, tiny):
    status, text = _post(f"{http}/v1/completions", {"prompt": QUESTIONS[30], "blocks": 2, "tokens_per_step": 4})
    body = json.loads(text)
    direct = paradec.generate(tiny, QUESTIONS[30], **SMALL)
    assert status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == direct.summary and body["paradec"]["blocks"] == direct.blocks
    assert body["usage"]["completion_tokens"] == len(direct.summary_token_ids)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == sum(map(len, direct.block_token_ids))
    assert body["choices"][0]["finish_reason"] == direct.finish_reason
    status, text = _post(f"{http}/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[30]}],
                                                          "stream": True, "stop": ["####"], **SMALL})
    events = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert any("committed" in c["paradec"] for c in chunks)  # per-step canvas progress
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    stopped = paradec.generate(tiny, [{"role": "user", "content": QUESTIONS[30]}], stop=["####"], **SMALL)
    assert text == stopped.text == direct.summary[: direct.summary.index("####")]  # the engine cut it
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_http_bad_input_health_and_metrics(http):
    assert _post(f"{http}/v1/completions", {"prompt": "q ?", "pickle": 1})[0] == 400
    assert _post(f"{http}/v1/completions", {"prompt": "q ?", "blocks": 0})[0] == 400
    assert _post(f"{http}/v1/chat/completions", {"messages": []})[0] == 400
    with urllib.request.urlopen(f"{http}/health", timeout=30) as response:
        assert response.status == 200 and json.loads(response.read())["healthy"] is True
    with urllib.request.urlopen(f"{http}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'paradec_requests_total{outcome="finished"}' in metrics and "paradec_engine_healthy 1" in metrics


def test_ranks_batch_requests_by_how_their_refresh_resolves():
    """Under several ranks requests batch when they decode alike: partial_refresh left unset and
    its resolved value share a batch; the full refresh does not join the default's."""
    from paradec import GenerationConfig
    from paradec.serve.engine import Request
    from paradec.serve.ranks import batches_with

    def request(**settings):
        return Request("r", [1, 2], GenerationConfig(**settings), stream=False, deadline=None)

    nap = dict(window=4)  # nap windows: unset is the partial refresh
    unset, partial, full = request(**nap), request(**nap, partial_refresh=True), request(**nap, partial_refresh=False)
    assert batches_with(unset, partial) and batches_with(partial, unset)
    assert not batches_with(unset, full) and not batches_with(full, partial)
    block = dict(mode="block", answer_len=8, block_len=4)  # block mode: unset is the full refresh
    assert batches_with(request(**block), request(**block, partial_refresh=False))
    assert not batches_with(request(**block), request(**block, partial_refresh=True))
    # sampled: row r of a batch draws from the first's seed + r, so a request joins as the row its seed names
    sampled = dict(temperature=0.8)
    first = request(**sampled, seed=5)
    assert batches_with(first, request(**sampled, seed=6), row=1) and batches_with(first, request(**sampled, seed=7), 2)
    assert not batches_with(first, request(**sampled, seed=7), row=1)
    assert not batches_with(first, request(**sampled, seed=5), row=1)  # the same draws as the first: not its row
    assert not batches_with(first, request(temperature=0.7, seed=6), row=1)
    assert not batches_with(request(**sampled, seed=5, attention="canvas"),
                            request(**sampled, seed=6, attention="canvas"), row=1)
