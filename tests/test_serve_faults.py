"""Fault injection against ``paradec serve`` (issue 22): a hostile client or a failure per case,
each checking that the server answers — every accepted request ends with exactly one result or
one error within its deadline, no client slows, wedges or crashes another's request, no process
outlives a stop, and liveness means progress (DESIGN.md contract 8).

One frontend (with an HTTP app in front of it) serves the cases that leave it healthy; the
stuck-engine case runs last on it (the engine is killed and restarted); the signal cases start
``paradec serve`` itself. Every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import msgpack
import pytest
import zmq

from paradec.config import GenerationConfig
from paradec.errors import CheckpointError, ConfigError
from paradec.serve import Client, EngineDead, ServeError
from paradec.serve.frontend import BackgroundFrontend, EngineTarget, Frontend
from paradec.serve.process import alive, command_line, descendants, survivors
from paradec.serve.protocol import PROCESS_SETTINGS, REQUEST_SETTINGS, Limits, MessageType, ProtocolError, decode, encode

from dist_worker import free_port

TOKEN = "fault-injection-token-0123"  # HTTP's bearer token here (at least 16 characters)
SMALL = {"blocks": 2, "tokens_per_step": 4}  # a few steps
LONG = {"blocks": 4, "tokens_per_step": 1, "eos_closes_block": False}  # 48 steps: in flight for a while
LONGER = {"blocks": 4, "block_len": 100, "tokens_per_step": 1, "eos_closes_block": False}  # 108 wider steps
QUESTION = "Zoe has 30 apples and gives 2 away. How many are left?"
STALL_S = 3.0  # the stall timeout of the stuck-engine case (off before it: on two busy cores a step can take seconds)
BODY_LIMIT = 256 * 1024


def _wait(predicate, timeout_s: float, every_s: float = 0.1):
    """predicate()'s first truthy value within timeout_s, else its last value."""
    deadline = time.monotonic() + timeout_s
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(every_s)
        value = predicate()
    return value


@pytest.fixture(scope="module")
def server():
    target = EngineTarget("paradec-tiny", max_batch=8, device="cpu")
    s = BackgroundFrontend((f"tcp://127.0.0.1:{free_port()}", target),
                           dict(max_pending=8, stall_timeout_s=None, restart=True, request_timeout_s=120),
                           start_timeout_s=180)
    yield s
    s.stop()


def _web(app) -> tuple[str, object, threading.Thread]:
    import uvicorn

    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    assert _wait(lambda: web.started, 30, 0.05)
    return f"http://127.0.0.1:{port}", web, thread


@pytest.fixture(scope="module")
def http(server):
    pytest.importorskip("uvicorn")
    from paradec.serve.http import create_app

    url, web, thread = _web(create_app(server.address, token=TOKEN, timeout_s=60, max_body_bytes=BODY_LIMIT))
    yield url
    web.should_exit = True
    thread.join(10)


def _raw(address: str, **options) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(address)
    return sock


def _reply(sock: zmq.Socket, timeout_s: float = 30.0):
    assert sock.poll(int(timeout_s * 1000)), "no reply"
    return decode(sock.recv_multipart())


def _add(sock: zmq.Socket, request_id: str, config: dict, **fields) -> None:
    """An ADD as raw msgpack: the client-side checks in ``encode`` are what a hostile client skips."""
    body = {"id": request_id, "prompt": QUESTION, "config": config, **fields}
    sock.send_multipart([bytes([MessageType.ADD]), msgpack.packb(body)])


def _stats(address: str) -> dict:
    with Client(address) as client:
        return client.stats()


def _post(url: str, body, headers: dict | None = None, timeout_s: float = 120.0) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    request = urllib.request.Request(url, data, headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _raw_http(url: str, head: bytes, body_parts: list[bytes] = (), timeout_s: float = 20.0) -> int:
    """The status of a hand-written HTTP request (head without its blank line, then body parts)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout_s) as s:
        s.sendall(head + b"\r\n")
        try:
            for part in body_parts:
                s.sendall(part)
        except OSError:  # the server answered and closed before reading it all: what a limit does
            pass
        first = b""
        while b"\r\n" not in first:
            chunk = s.recv(4096)
            if not chunk:
                break
            first += chunk
    return int(first.split(b" ")[1])


# --- 1. a client that sends and never reads ---------------------------------------------------


def test_flooder_that_never_reads_costs_only_its_own_replies(server):
    # a streaming request and 30 000 stats requests; its receive queue and buffer as small as it can ask
    before = _stats(server.address)
    flooder = _raw(server.address, RCVHWM=1, RCVBUF=4096, SNDHWM=0)
    _add(flooder, "flood", LONG, stream=True)
    stats = encode(MessageType.UTILITY, {"id": "s", "method": "stats"})
    for _ in range(30_000):
        flooder.send_multipart(stats)
    with Client(server.address, timeout_s=120) as client:  # a well-behaved client is served meanwhile
        assert client.generate(QUESTION, **SMALL).summary is not None
        assert client.health()["healthy"]
        after = _wait(lambda: (s := client.stats())["in_flight"] == 0 and s, 60)
    assert after, "the flooder's request was never closed"
    lost = after["disconnected"] + after["undelivered"] - before["disconnected"] - before["undelivered"]
    assert lost == 1  # its stream was aborted (or its result dropped): it does not read
    assert server.call(lambda: [t.done() for t in server.frontend.tasks]) == [False] * 3  # every loop still runs
    flooder.close()


# --- 2. oversize fields; replies never larger than a frame; slots always freed --------------------


def test_oversize_config_values_are_refused_with_short_errors_and_free_their_slots(server):
    sock = _raw(server.address)
    cases = {"seed": [0] * 400_000, "policy": "x" * 500_000, "blocks": {"a": [1] * 1000}}
    for round_ in range(3):  # more than max_pending (8) of them: a leaked slot would make later ones busy
        for name, value in cases.items():
            _add(sock, f"{name}{round_}", {name: value})
            reply = _reply(sock)
            assert reply.type == MessageType.ERROR and reply.body["code"] == "too_large", reply.body
            assert f"config.{name}" in reply.body["message"] and len(reply.body["message"]) < 2100
    # a huge method name and many unknown fields: refused, their echo cut
    sock.send_multipart([bytes([MessageType.UTILITY]), msgpack.packb({"id": "m", "method": "x" * 900_000})])
    assert len(_reply(sock).body["message"]) <= Limits().max_message_chars
    sock.send_multipart([bytes([MessageType.ADD]), msgpack.packb({"id": "k", **{f"f{i}": 0 for i in range(50_000)}})])
    assert len(_reply(sock).body["message"]) <= Limits().max_message_chars
    sock.send_multipart([bytes([MessageType.ADD]), msgpack.packb({b"id": "b", "prompt": "q"})])  # a bytes key
    assert _reply(sock).body["code"] == "invalid"
    sock.close()
    assert _stats(server.address)["in_flight"] == 0
    with Client(server.address, timeout_s=120) as client:
        assert client.generate(QUESTION, **SMALL).summary is not None


def test_a_result_too_large_for_a_frame_becomes_an_error(tmp_path):
    from paradec.serve.engine import EngineLoop

    engine = EngineLoop(None, f"ipc://{tmp_path}/r", f"ipc://{tmp_path}/o", limits=Limits(max_frame_bytes=4096),
                    context=zmq.Context())
    sent = []
    engine.outputs.close(0)
    engine.outputs = type("Sink", (), {"send_multipart": lambda self, frames: sent.append(frames)})()
    engine._send(MessageType.OUTPUT, {"id": "r1", "kind": "final", "result": {"blocks": ["x" * 10_000]}}, [[1], [0]])
    engine._error("r2", "invalid", "y" * 1_000_000)
    first, second = (decode(f) for f in sent)
    assert first.type == MessageType.ERROR and first.body["id"] == "r1" and first.body["code"] == "too_large"
    assert second.body["code"] == "invalid" and len(sent[1][1]) < 2100
    engine.requests.close(0)


def test_a_failed_engine_step_fails_its_requests_and_the_engine_goes_on(tmp_path):
    import paradec
    from paradec.serve.engine import EngineLoop
    from paradec.serve.protocol import Message

    model = paradec.load("paradec-tiny")
    engine = EngineLoop(model, f"ipc://{tmp_path}/r", f"ipc://{tmp_path}/o", max_batch=2, context=zmq.Context())
    sent = []
    engine.outputs.close(0)
    engine.outputs = type("Sink", (), {"send_multipart": lambda self, frames: sent.append(decode(frames))})()
    engine._start()
    prompts = {"a": "1 + 2 = ?", "b": "3 + 4 = ?", "c": QUESTION, "d": "5 + 6 = ?", "e": "7 + 8 = ?", "f": "9 + 1 = ?"}

    def add(request_id):
        engine._add(Message(MessageType.ADD, {"id": request_id, "prompt": prompts[request_id], "config": SMALL}))

    def finals():
        ends = {}
        for m in sent:
            if m.type == MessageType.ERROR or m.body.get("kind") == "final":
                assert m.id not in ends, m.body  # one final message per request
                ends[m.id] = m
        return ends

    def raising(message):
        def fail(*_):
            raise RuntimeError(message)
        return fail

    for request_id in "abc":
        add(request_id)
    engine._work()  # a and b take the two rows (c waits)
    calls = engine.engine.calls
    real = calls.step_logits
    calls.step_logits = raising("injected")  # mid-step: after admission, before the commits
    engine._work()
    calls.step_logits = real
    while engine._busy():  # c decodes in a freed row, alone
        engine._work()
    ends = finals()
    assert {i: (m.type, m.body.get("code")) for i, m in ends.items()} == {
        "a": (MessageType.ERROR, "failed"), "b": (MessageType.ERROR, "failed"), "c": (MessageType.OUTPUT, None)}
    assert "RuntimeError: injected" in ends["a"].body["message"]
    direct = paradec.generate(model, QUESTION, **SMALL)
    assert ends["c"].buffers[0].tolist() == direct.token_ids and ends["c"].buffers[1].tolist() == direct.trace
    # a batching engine that cannot even drop the failed requests is replaced: every request in it
    # fails, the waiting one (f) too
    for request_id in "def":
        add(request_id)
    engine._work()
    engine.engine.abort = raising("broken")
    engine.engine.step = raising("injected again")
    engine._work()
    assert not engine._busy() and {i: m.body.get("code") for i, m in finals().items() if i in "def"} == {
        "d": "failed", "e": "failed", "f": "failed"}
    sent.clear()
    add("c")
    add("a")
    engine._work()
    engine._work()  # both decoding in the new batching engine
    engine.live["a"].request.deadline = 0.0  # a's deadline passes mid-decode: it leaves, c goes on
    engine._expire()
    while engine._busy():
        engine._work()
    ends = finals()
    assert ends["a"].body["code"] == "timeout" and ends["a"].body["message"].startswith("timed out after")
    assert ends["c"].buffers[0].tolist() == direct.token_ids
    engine.requests.close(0)


# --- 3. HTTP requests do not share fate; deadlines; lost results are not "finished" ----------------


def test_one_oversize_http_request_does_not_hang_the_others(server, http):
    url = f"{http}/v1/completions"
    bodies = [{"prompt": QUESTION, **SMALL}] * 3 + [
        {"prompt": QUESTION, "policy": "x" * 2_000_000},  # over the body limit: 413 unread
        {"prompt": QUESTION, "policy": "x" * 100_000},  # under it, but a setting that long: 413
        {"prompt": QUESTION, "seed": [0] * 40_000},  # a list where a number goes: 413
        {"prompt": "x" * 40_000, **SMALL},  # a prompt over 32 768 characters: 413 before it is sent
    ]
    start = time.monotonic()
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: _post(url, b), bodies))
    assert [status for status, _ in answers] == [200, 200, 200, 413, 413, 413, 413], answers
    assert time.monotonic() - start < 100
    assert all(json.loads(text)["choices"][0]["text"] is not None for _, text in answers[:3])


def test_http_requests_get_a_server_side_deadline(server):
    from paradec.serve.http import create_app

    url, web, thread = _web(create_app(server.address, timeout_s=0.5))
    try:
        before = _stats(server.address)
        start = time.monotonic()
        status, text = _post(f"{url}/v1/completions", {"prompt": QUESTION, **LONGER})
        assert status == 504 and time.monotonic() - start < 10, text
        after = _wait(lambda: (s := _stats(server.address))["in_flight"] == 0 and s, 30)
        assert after["timeout"] == before["timeout"] + 1 and after["finished"] == before["finished"]
    finally:
        web.should_exit = True
        thread.join(10)


def test_requests_the_engine_refuses_are_counted_refused_not_errors(server):
    """A setting or prompt the engine refuses (ERROR invalid / too_large, before it is queued) counts
    as ``refused``, not as ``errors`` (a failure once queued): bad input is told from faults."""
    before = _stats(server.address)
    with Client(server.address, timeout_s=60) as client:
        for settings, code in ((dict(policy="nonsense"), "invalid"), (dict(tokens_per_step=-3), "invalid"),
                               (dict(blocks=8, block_len=100), "too_large")):
            with pytest.raises(ServeError) as caught:
                client.generate(QUESTION, **settings)
            assert caught.value.code == code
    after = _wait(lambda: (s := _stats(server.address))["in_flight"] == 0 and s, 30)
    assert after["refused"] == before["refused"] + 3 and after["errors"] == before["errors"]
    assert after["accepted"] == before["accepted"] + 3


def test_a_lost_result_is_counted_undelivered_not_finished(server):
    before = _stats(server.address)
    sock = _raw(server.address)
    _add(sock, "gone", SMALL)  # non-streaming, and gone before its result
    sock.close(linger=2000)  # the ADD still leaves; then the connection closes
    after = _wait(lambda: (s := _stats(server.address))["accepted"] > before["accepted"] and s["in_flight"] == 0
                  and s, 60)
    assert after and after["undelivered"] == before["undelivered"] + 1
    assert after["finished"] == before["finished"]


def test_an_http_client_that_hangs_up_aborts_its_request(server, http):
    before = _stats(server.address)
    body = json.dumps({"prompt": QUESTION, **LONGER}).encode()
    host, port = http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        assert _wait(lambda: _stats(server.address)["in_flight"] == 1, 30)
    after = _wait(lambda: (s := _stats(server.address))["in_flight"] == 0 and s, 30)
    assert after and after["aborted"] == before["aborted"] + 1 and after["finished"] == before["finished"]


def test_one_refused_prompt_fails_the_body_and_aborts_its_other_prompts(server, http):
    """Several prompts in one body are several requests: one refused (the engine: invalid; the
    frontend: busy) fails the whole HTTP request with its status, naming the prompt, and the
    others are aborted, not left decoding; a client that hangs up aborts all of them."""
    url = f"{http}/v1/completions"
    for prompts, status, code in [([QUESTION, QUESTION, " "], 400, "invalid"), ([QUESTION] * 3, 503, "busy")]:
        if code == "busy":
            server.call(lambda: setattr(server.frontend, "max_pending", 2))
        try:
            before = _stats(server.address)
            answer, text = _post(url, {"prompt": prompts, **LONGER})
        finally:
            server.call(lambda: setattr(server.frontend, "max_pending", 8))
        error = json.loads(text)["error"]
        assert answer == status and error["code"] == code and error["message"].startswith("prompt[2]: "), text
        after = _wait(lambda: (s := _stats(server.address))["in_flight"] == 0 and s, 30)
        assert after["aborted"] == before["aborted"] + 2 and after["finished"] == before["finished"], (before, after)
    host, port = http.removeprefix("http://").split(":")
    for stream in (False, True):
        before = _stats(server.address)
        body = json.dumps({"prompt": [QUESTION] * 3, "stream": stream, **LONGER}).encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Authorization: Bearer " + TOKEN.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                      + b"\r\n\r\n" + body)
            assert _wait(lambda: _stats(server.address)["in_flight"] == 3, 30)
            if stream:
                assert s.recv(12) == b"HTTP/1.1 200"  # hung up mid-stream
        after = _wait(lambda: (s := _stats(server.address))["in_flight"] == 0 and s, 30)
        assert after and after["aborted"] == before["aborted"] + 3 and after["finished"] == before["finished"]


def test_a_refused_stream_keeps_its_http_status(server, http):
    """A stream answers 200 only once the engine accepted its request: a refusal (busy, a
    config the engine refuses, a malformed message) is its status, as without stream; busy
    says when to try again (Retry-After)."""
    url = f"{http}/v1/chat/completions"
    chat = [{"role": "user", "content": QUESTION}]
    server.call(lambda: setattr(server.frontend, "max_pending", 0))  # every request is refused: busy
    try:
        for stream in (True, False):
            status, text = _post(url, {"messages": chat, "stream": stream, **SMALL})
            assert status == 503 and json.loads(text)["error"]["code"] == "busy", (stream, text)
        request = urllib.request.Request(url, json.dumps({"messages": chat, **SMALL}).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=60)
        assert caught.value.code == 503 and caught.value.headers["Retry-After"] == "1"
    finally:
        server.call(lambda: setattr(server.frontend, "max_pending", 8))
    status, text = _post(url, {"messages": chat, "stream": True, "blocks": 0})  # the engine refuses it
    assert status == 400 and "blocks must be" in json.loads(text)["error"]["message"], text
    tool = [{"role": "tool", "content": "42"}]
    status, text = _post(url, {"messages": tool, "stream": True, **SMALL})  # the wire refuses it
    assert status == 400 and json.loads(text)["error"]["param"] == "messages", text
    status, text = _post(url, {"messages": chat, "stream": True, **SMALL})
    assert status == 200 and text.rstrip().endswith("data: [DONE]") and '"error"' not in text, text


def test_an_http_body_that_stalls_gets_408_within_the_deadline(server):
    from paradec.serve.http import create_app

    url, web, thread = _web(create_app(server.address, timeout_s=0.5))
    try:
        start = time.monotonic()
        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        assert _raw_http(url, head, [b'{"prompt": "q'], timeout_s=10) == 408  # 13 of its 100 bytes, then nothing
        assert time.monotonic() - start < 5
    finally:
        web.should_exit = True
        thread.join(10)


# --- 4. process settings are the operator's ------------------------------------------------------


def test_process_settings_are_refused_by_name(server, http):
    assert {"rank_timeout_s", "prompt_kv", "gather", "results_on", "cuda_graphs"} <= PROCESS_SETTINGS
    assert not PROCESS_SETTINGS & REQUEST_SETTINGS  # a field added later is refused until it is listed
    sock = _raw(server.address)
    hostile = {"rank_timeout_s": 1e-6, "prompt_kv": "broadcast", "gather": "kv", "results_on": "all",
               "cuda_graphs": False}
    for name, value in hostile.items():
        _add(sock, name, {name: value})
        reply = _reply(sock)
        assert reply.body["code"] == "invalid" and f"config.{name} is a process setting" in reply.body["message"]
        status, text = _post(f"{http}/v1/completions", {"prompt": QUESTION, name: value})
        assert status == 400 and name in json.loads(text)["error"]["message"]
    for name in ("device", "dtype"):
        _add(sock, name, {name: "cpu"})
        assert "unknown setting" in _reply(sock).body["message"]
    sock.close()
    with Client(server.address, timeout_s=60) as client:  # the Python client refuses them before sending
        with pytest.raises(ProtocolError, match="rank_timeout_s is a process setting"):
            client.generate(QUESTION, rank_timeout_s=1e-6)
        with pytest.raises(ProtocolError, match="rank_timeout_s is a process setting"):
            client.generate(QUESTION, GenerationConfig(rank_timeout_s=1e-6))
        assert client.generate(QUESTION, GenerationConfig(blocks=2, tokens_per_step=4)).summary is not None


# --- 8. HTTP bodies ------------------------------------------------------------------------------


def test_http_body_limit_is_enforced_before_reading_and_bad_bytes_get_400(http):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + TOKEN.encode() + b"\r\n")
    start = time.monotonic()
    assert _raw_http(http, head + b"Content-Length: 300000000\r\n") == 413  # not a byte of it sent
    assert time.monotonic() - start < 10
    chunk = b"%x\r\n%s\r\n" % (64 * 1024, b" " * 64 * 1024)
    assert _raw_http(http, head + b"Transfer-Encoding: chunked\r\n", [chunk] * 5) == 413  # no length: cut at 256 KiB
    assert _post(f"{http}/v1/completions", b'{"prompt": "\xff\xfe"}')[0] == 400  # not UTF-8
    assert _post(f"{http}/v1/completions", b'[' * 100_000)[0] == 400  # not JSON (nested too deep)


def test_values_a_message_cannot_carry_are_refused_by_name_before_anything_is_sent():
    """JSON takes integers past 64 bits and lone surrogates; msgpack does not. HTTP answers 400
    naming the field (a stream too: before its 200), the clients raise ProtocolError naming it."""
    import asyncio

    from starlette.testclient import TestClient

    from paradec.serve import AsyncClient
    from paradec.serve.http import create_app

    web = TestClient(create_app("tcp://127.0.0.1:1", timeout_s=5), raise_server_exceptions=False)  # nobody there
    chat = [{"role": "user", "content": QUESTION}]
    cases = [  # (route, body, the param named, what its message says)
        ("/v1/completions", {"prompt": QUESTION, "max_tokens": 2**64}, "max_tokens",
         "max_tokens must lie in -2**63 to 2**64 - 1"),
        ("/v1/completions", {"prompt": QUESTION, "blocks": -2**63 - 1}, "blocks", "got one below that range"),
        ("/v1/completions", {"prompt": "hi \ud800"}, "prompt", r"lone surrogate '\ud800' at character 3"),
        ("/v1/completions", {"prompt": QUESTION, "stop": ["####", "\udfff"]}, "stop", "stop[1] is not valid Unicode"),
        ("/v1/chat/completions", {"messages": chat, "seed": 2**64}, "seed", "seed must lie in"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages",
         "messages[0].content is not valid Unicode")]
    for route, body, param, said in cases:
        for stream in (False, True):
            response = web.post(route, content=json.dumps({**body, "stream": stream}),
                                headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (body, stream, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", error
            assert said in error["message"], error["message"]
    with Client("tcp://127.0.0.1:1") as client:
        with pytest.raises(ProtocolError, match=re.escape("config.seed must lie in -2**63 to 2**64 - 1")):
            client.generate(QUESTION, seed=2**64)
        with pytest.raises(ProtocolError, match="prompt is not valid Unicode text"):
            client.generate("hi \ud800")
    asynchronous = AsyncClient("tcp://127.0.0.1:1")
    try:
        with pytest.raises(ProtocolError, match=re.escape("config.stop[0] is not valid Unicode text")):
            asyncio.run(asynchronous.generate(QUESTION, stop=["\udfff"]))
    finally:
        asynchronous.close()


# --- 10. the rest -------------------------------------------------------------------------------


def test_http_health_shows_no_pid_and_the_bearer_scheme_is_case_insensitive(http):
    with urllib.request.urlopen(f"{http}/health", timeout=30) as response:
        health = json.loads(response.read())
    assert health["healthy"] is True and "engine_pid" not in health
    for scheme, token, expected in [("Bearer", TOKEN, 200), ("bearer", TOKEN, 200), ("BEARER", TOKEN, 200),
                                    ("Bearer", TOKEN[:-1], 401), ("Basic", TOKEN, 401)]:
        request = urllib.request.Request(f"{http}/metrics", headers={"Authorization": f"{scheme} {token}"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == expected
                assert 'outcome="undelivered"' in response.read().decode()
        except urllib.error.HTTPError as e:
            assert e.code == expected, (scheme, token)


def test_token_comes_from_a_file_or_the_environment_and_is_long_enough(tmp_path, monkeypatch):
    import argparse

    from paradec.serve.server import read_token

    monkeypatch.delenv("PARADEC_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="ps shows it"):
        read_token(argparse.Namespace(token=TOKEN, token_file=None))
    short = tmp_path / "short"
    short.write_text("s3cret\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(argparse.Namespace(token=None, token_file=str(short)))
    good = tmp_path / "good"
    good.write_text(TOKEN + "\n")
    assert read_token(argparse.Namespace(token=None, token_file=str(good))) == TOKEN
    monkeypatch.setenv("PARADEC_TOKEN", TOKEN)
    assert read_token(argparse.Namespace(token=None, token_file=None)) == TOKEN
    with pytest.raises(ConfigError, match="at least 16"):
        Frontend("tcp://127.0.0.1:1", None, token="short")


def test_engine_target_takes_a_kv_memory_fraction_in_range():
    assert EngineTarget("paradec-tiny", max_batch=2, device="cpu", kv_memory_fraction=0.5).kv_memory_fraction == 0.5
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="kv_memory_fraction must lie in"):
            EngineTarget("paradec-tiny", kv_memory_fraction=bad)


@pytest.mark.parametrize("flags,names", [
    (["--warm-up", "[1, 2]"], "--warm-up takes a JSON object"),
    (["--warm-up", '{"blocks": 0}'], "blocks"),
    (["--warm-up", '{"no_such_setting": 1}'], "no_such_setting"),
    (["--kv-memory-fraction", "0"], "--kv-memory-fraction must lie in"),
    (["--request-timeout-s", "inf"], "--request-timeout-s must be a finite number > 0, got inf"),
    (["--request-timeout-s", "nan"], "--request-timeout-s must be a finite number > 0, got nan"),
    (["--stall-timeout-s", "inf"], "--stall-timeout-s must be a finite number >= 0"),
    (["--stall-timeout-s", "nan"], "--stall-timeout-s must be a finite number >= 0"),
    (["--served-model-name", ""], "--served-model-name must be 1 to 256 characters"),
    (["--served-model-name", " x"], "--served-model-name must be 1 to 256 characters"),
])
def test_serve_refuses_bad_warm_up_and_pool_flags_before_starting(flags, names):
    from paradec.cli import parser
    from paradec.serve.server import serve

    args = parser().parse_args(["serve", "--model", "paradec-tiny", "--device", "cpu", *flags])
    with pytest.raises(ConfigError, match=names):
        serve(args)


@pytest.mark.parametrize("flags,error,names", [
    # valid settings that the batching engine's rows cannot decode: found only once the model is loaded
    (["--model", "paradec-tiny", "--warm-up", '{"blocks": 64}'], ConfigError,
     r'warm-up settings \{"blocks": 64\}: blocks=64; this engine decodes at most max_blocks=16'),
    (["--model", "/no/such/checkpoint"], CheckpointError, "/no/such/checkpoint: not a checkpoint directory"),
    # rank 0's own error, not the broadcast to ranks that failed alike and are gone
    (["--model", "/no/such/checkpoint", "--nproc", "2"], CheckpointError,
     "/no/such/checkpoint: not a checkpoint directory"),
])
def test_an_engine_that_cannot_start_fails_serve_with_its_own_error(flags, error, names):
    """The engine process's error reaches the frontend (and ``paradec serve``'s exit message) with
    its class and text, not as a bare exit code."""
    from paradec.cli import parser
    from paradec.serve.server import serve

    args = parser().parse_args(["serve", "--device", "cpu", "--address", f"tcp://127.0.0.1:{free_port()}", *flags])
    with pytest.raises(error, match=names) as raised:
        serve(args)
    assert str(raised.value).startswith(f"the engine exited while starting (code 1): {error.__name__}: ")


def test_the_served_model_name_is_the_flag_else_the_model_as_given():
    from paradec.cli import parser
    from paradec.serve.server import served_model_name

    for flags, name in [(["--model", "/ckpt/llada-8b"], "/ckpt/llada-8b"),
                        (["--model", "/ckpt/llada-8b", "--served-model-name", "llada"], "llada")]:
        assert served_model_name(parser().parse_args(["serve", *flags])) == name


def test_an_infinite_request_timeout_is_refused_where_it_is_set():
    """inf or nan as every request's deadline would make every request fail: refused at once."""
    from paradec.serve.http import create_app

    for bad in (float("inf"), float("nan"), 0):
        with pytest.raises(ConfigError, match="timeout_s must be a finite number > 0 or None"):
            create_app("tcp://127.0.0.1:1", timeout_s=bad)
        with pytest.raises(ConfigError, match="request_timeout_s must be a finite number > 0 or None"):
            Frontend("tcp://127.0.0.1:1", None, request_timeout_s=bad)


def test_client_docstring_names_what_exists():
    import paradec.serve
    import paradec.serve.client as client

    assert "from paradec.serve import Client" in client.__doc__ and "paradec.Client(" not in client.__doc__
    assert paradec.serve.Client is client.Client


# --- 6. liveness is progress: a stopped engine is found, its requests end, it is replaced -----------


def test_stopped_engine_fails_its_requests_in_time_and_is_restarted(server, monkeypatch):
    import paradec.serve.client

    # the client waits 10 s past a deadline before its own TimeoutError: an error within 1.5 + 8 s
    # is the server's, however late a loaded machine's frontend thread delivers it
    monkeypatch.setattr(paradec.serve.client, "GRACE_S", 10.0)
    first_pid = server.frontend.engine.pid
    server.call(lambda: setattr(server.frontend, "stall_timeout_s", STALL_S))
    with Client(server.address, timeout_s=120) as waiting, Client(server.address) as late, \
            Client(server.address, timeout_s=30) as watcher:
        stream = waiting.stream(QUESTION, **LONG)
        next(stream)  # decoding now
        os.kill(first_pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with pytest.raises(ServeError, match="timeout"):  # the deadline runs from arrival, enforced here
                late.generate(QUESTION, timeout_s=1.5, **SMALL)
            assert time.monotonic() - start < 1.5 + 8
            with pytest.raises(ServeError, match="stalled"):
                for _ in stream:
                    pass
            assert time.monotonic() - start < STALL_S + 5
            assert watcher.health()["healthy"] is False
        finally:
            server.call(lambda: setattr(server.frontend, "stall_timeout_s", None))
            if alive(first_pid):  # the frontend SIGKILLs it; continue it if the test failed before
                os.kill(first_pid, signal.SIGCONT)
        assert _wait(lambda: not alive(first_pid), 10)
        assert _wait(lambda: watcher.health()["healthy"], 120)
        assert watcher.health()["restarts"] == 1
        assert waiting.generate(QUESTION, **SMALL).summary is not None
        # an engine that dies is replaced too
        second_pid = server.frontend.engine.pid
        os.kill(second_pid, signal.SIGKILL)
        assert _wait(lambda: not watcher.health()["healthy"], 10)
        with pytest.raises(EngineDead) as dead:  # a new engine is starting: worth a retry shortly
            late.generate(QUESTION, **SMALL)
        assert dead.value.restarting and "retry shortly" in dead.value.message
        from paradec.serve.http import _failure

        assert _failure(dead.value, False, {}).headers["Retry-After"] == "1"  # an HTTP 503 says when
        assert "Retry-After" not in _failure(EngineDead("gone for good"), False, {}).headers  # --no-restart
        assert _wait(lambda: watcher.health()["healthy"], 120)
        stats = watcher.stats()
        assert stats["restarts"] == 2 and stats["stalled"] >= 1 and stats["in_flight"] == 0
        assert waiting.generate(QUESTION, **SMALL).summary is not None


# --- 5. signals: every process ends, in-flight clients hear why --------------------------------------


def _launch(tmp_path, *flags: str, token: str | None = None):
    """``paradec serve`` as its own process; (process, ZeroMQ address, HTTP url or None)."""
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    command = [sys.executable, "-m", "paradec", "serve", "--model", "paradec-tiny", "--device", "cpu",
               "--address", address, "--http-port", str(port), *flags]
    env = dict(os.environ)
    if token is not None:
        (tmp_path / "token").write_text(token)
        command += ["--token-file", str(tmp_path / "token")]
    log = open(tmp_path / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def healthy():
        assert process.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        with Client(address, token=token) as probe:
            try:
                if not probe.health(timeout_s=1)["healthy"]:
                    return False
            except TimeoutError:
                return False
        try:  # HTTP starts once the engine is ready
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    assert _wait(healthy, 180, 0.2)
    return process, address, f"http://127.0.0.1:{port}"


def _stop_and_check(process, sig: int, tmp_path) -> None:
    """Sends ``sig``; the frontend exits (0 unless SIGKILL) within 10 s and no process it
    started outlives it (engine, ranks, multiprocessing's resource tracker)."""
    family = descendants(process.pid)
    assert any("spawn_main" in line for _, line in family.values()), family  # the engine is among them
    start = time.monotonic()
    process.send_signal(sig)
    try:
        code = process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"not stopped within 10 s: {(tmp_path / 'serve.log').read_text()[-3000:]}")
    assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), (tmp_path / "serve.log").read_text()[-3000:]
    left = _wait(lambda: not survivors(family), 10) or survivors(family)
    assert left is True, f"outlived the frontend: {left}"
    assert time.monotonic() - start < 20


def _in_flight(address: str, token: str | None, settings: dict, errors: list, stream: bool = False):
    """A client thread with one request in flight; what it ends with goes into ``errors``."""
    def run():
        with Client(address, token=token, timeout_s=60) as client:
            try:
                list(client.stream(QUESTION, progress=stream, **settings))
                errors.append("finished")
            except Exception as e:  # noqa: BLE001 - recorded for the test
                errors.append(getattr(e, "code", repr(e)))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_sigterm_with_ranks_and_stuck_http_requests_stops_everything(tmp_path):
    process, address, url = _launch(tmp_path, "--nproc", "2", token=TOKEN)
    try:
        assert TOKEN not in command_line(process.pid)  # the secret is not on the command line
        outcomes: list = []
        thread = _in_flight(address, TOKEN, LONGER, outcomes)
        http_answer: list = []
        web = threading.Thread(target=lambda: http_answer.append(
            _post(f"{url}/v1/completions", {"prompt": QUESTION, **LONGER}, timeout_s=30)), daemon=True)
        web.start()
        stuck = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=10)
        stuck.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"pro")  # never ends
        with Client(address, token=TOKEN) as probe:
            assert _wait(lambda: probe.stats()["in_flight"] == 2, 60)
        _stop_and_check(process, signal.SIGTERM, tmp_path)
        thread.join(10)
        web.join(10)
        stuck.close()
        assert outcomes == ["shutting_down"]
        assert http_answer and http_answer[0][0] == 503 and "shutting_down" in http_answer[0][1]
    finally:
        if process.poll() is None:
            process.kill()


def test_sigint_stops_everything(tmp_path):
    process, address, _ = _launch(tmp_path)
    try:
        outcomes: list = []
        thread = _in_flight(address, None, LONG, outcomes, stream=True)
        with Client(address) as probe:
            assert _wait(lambda: probe.stats()["in_flight"] == 1, 60)
        _stop_and_check(process, signal.SIGINT, tmp_path)
        thread.join(10)
        assert outcomes == ["shutting_down"]
    finally:
        if process.poll() is None:
            process.kill()


def test_kill_9_of_the_frontend_ends_the_engine_and_its_ranks(tmp_path):
    process, address, _ = _launch(tmp_path, "--nproc", "2")
    try:
        _stop_and_check(process, signal.SIGKILL, tmp_path)
    finally:
        if process.poll() is None:
            process.kill()
