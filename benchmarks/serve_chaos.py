"""Chaos on a paradec server: misbehaving clients mixed with well-behaved ones, an engine killed
mid-run and a SIGTERM at the end; counts what a server must never do (DESIGN.md contract 8).

``paradec serve`` runs as its own process (ZeroMQ and HTTP, a token from a file). For
``--duration-s`` seconds, ``--hostile`` clients cycle through misbehaviours — floods of requests
whose replies they never read, oversize and process-level settings, frames over the limit,
disconnects mid-request, aborts, wrong tokens, HTTP bodies over the limit or not UTF-8, HTTP
clients that hang up or never finish sending — while ``--good`` clients (a quarter of them over
HTTP) send greedy and sampled requests one after another, each on its own connection and
checking that every request gets exactly one final message. Midway the engine is killed (the
server restarts it). Then every client stops, the server must drain to zero requests in flight
with its counters adding up, a last burst of requests is sent, and the server gets SIGTERM: each
of those requests must end with ``shutting_down``, the server must exit 0 within 10 s and leave
no process behind. Finally every well-behaved result is compared with a direct
``paradec.generate()`` of the same prompt and settings in this process.

Prints the device and versions, a table, and one JSON line.

    cd benchmarks && python serve_chaos.py                      # paradec-tiny, 60 s, 8 hostile, 16 good
    cd benchmarks && python serve_chaos.py --duration-s 120 --hostile 12 --good 24 --nproc 2
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgpack
import zmq

import paradec
from harness import banner, emit_json
from paradec.serve import Client
from paradec.serve.client import request_body
from paradec.serve.process import descendants, survivors
from paradec.serve.protocol import MessageType, decode, encode
from paradec.train.tasks import arith

QUESTIONS = [p.question for p in arith.test_problems()[:8]]
GREEDY = [{"blocks": 2, "tokens_per_step": 4}, {"blocks": 4, "tokens_per_step": 2}]
SAMPLED = {"blocks": 2, "tokens_per_step": 4, "temperature": 0.8}
LONG = {"blocks": 4, "tokens_per_step": 1, "eos_closes_block": False}  # in flight for a while
SEEDS = 8
TOKEN = "chaos-" + os.urandom(12).hex()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Tally:
    """Counters shared by the client threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.codes: collections.Counter = collections.Counter()
        self.results: list[tuple[str, int, dict, dict]] = []  # (transport, question index, settings, result)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def code(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1


# --- well-behaved clients -------------------------------------------------------------------------


class GoodZmq:
    """One request at a time on its own DEALER, read to its final message; any second final
    message for a request (or one for a request it never sent) is counted."""

    def __init__(self, address: str, tally: Tally, name: str):
        self.address, self.tally, self.name = address, tally, name
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.ids = (f"{name}-{i}" for i in itertools.count())
        self.finals: set[str] = set()

    def request(self, question: int, settings: dict, timeout_s: float = 60.0) -> str:
        rid = next(self.ids)
        body, buffers = request_body(rid, QUESTIONS[question], None, settings, False, timeout_s, TOKEN)
        self.sock.send_multipart(encode(MessageType.ADD, body, buffers))
        self.tally.add("requests")
        deadline = time.monotonic() + timeout_s + 5  # the server's deadline, plus time for its ERROR to arrive
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000)):
                self.tally.add("lost")
                return "lost"
            message = decode(self.sock.recv_multipart())
            if self._stray(message, rid):
                continue
            if message.type == MessageType.OUTPUT and message.body["kind"] == "progress":
                continue
            self.finals.add(rid)
            if message.type == MessageType.OUTPUT:
                self.tally.add("results")
                result = {"token_ids": message.buffers[0].tolist(), "summary": message.body["result"]["summary"]}
                with self.tally.lock:
                    self.tally.results.append(("zmq", question, settings, result))
                return "result"
            code = "engine_dead" if message.type == MessageType.ENGINE_DEAD else message.body["code"]
            self.tally.code(code)
            self.tally.add("errors")
            return code

    def _stray(self, message, rid: str) -> bool:
        if message.id in self.finals:
            self.tally.add("duplicated")
            return True
        if message.id != rid:
            self.tally.add("stray")
            return True
        return False

    def drain(self, seconds: float) -> None:
        """Late messages: any is a duplicate or a stray."""
        end = time.monotonic() + seconds
        while self.sock.poll(max(0, int((end - time.monotonic()) * 1000))):
            self._stray(decode(self.sock.recv_multipart()), "")

    def close(self) -> None:
        self.sock.close(0)


def good_http(url: str, tally: Tally, question: int, settings: dict) -> str:
    tally.add("requests")
    status, text = post(url + "/v1/completions", {"prompt": QUESTIONS[question], **settings}, timeout_s=70)
    if status == 200:
        body = json.loads(text)
        tally.add("results")
        with tally.lock:
            tally.results.append(("http", question, settings, {"summary": body["choices"][0]["text"],
                                                                "blocks": body["paradec"]["blocks"]}))
        return "result"
    if status == 0:
        tally.add("lost")
        return "lost"
    code = json.loads(text)["error"]["code"]
    tally.code(code)
    tally.add("errors")
    return code


def post(url: str, body, token: str = TOKEN, timeout_s: float = 30.0) -> tuple[int, str]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json",
                                                 "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:  # no answer in time, or the connection broke
        return 0, ""


def good_loop(index: int, address: str, url: str, tally: Tally, stop: threading.Event) -> None:
    rng = random.Random(index)
    zmq_client = None if index % 4 == 3 else GoodZmq(address, tally, f"good{index}")
    try:
        while not stop.is_set():
            question = rng.randrange(len(QUESTIONS))
            settings = dict(rng.choice(GREEDY)) if rng.random() < 0.7 else {**SAMPLED, "seed": rng.randrange(SEEDS)}
            outcome = (zmq_client.request(question, settings) if zmq_client is not None
                       else good_http(url, tally, question, settings))
            if outcome in ("busy", "engine_dead", "stalled", "unavailable"):
                time.sleep(0.3)  # a well-behaved client backs off and retries
        if zmq_client is not None:
            zmq_client.drain(1.0)
    finally:
        if zmq_client is not None:
            zmq_client.close()


# --- hostile clients ------------------------------------------------------------------------------


def raw(address: str, **options) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(address)
    return sock


def raw_add(sock, rid: str, config: dict, token: str | None = TOKEN, **fields) -> None:
    body = {"id": rid, "prompt": QUESTIONS[0], "config": config, **fields}
    if token is not None:
        body["token"] = token
    sock.send_multipart([bytes([MessageType.ADD]), msgpack.packb(body)])


def expect_refusal(sock, tally: Tally, timeout_s: float = 30.0) -> None:
    """A message that must be answered with an ERROR: none in time is a lost reply."""
    if not sock.poll(int(timeout_s * 1000)):
        tally.add("lost")
        return
    message = decode(sock.recv_multipart())
    tally.code(message.body.get("code", "engine_dead"))


def flood(address: str, tally: Tally, n: int) -> None:
    sock = raw(address, RCVHWM=1, RCVBUF=4096, SNDHWM=0)
    raw_add(sock, "flood", LONG, stream=True)
    stats = encode(MessageType.UTILITY, {"id": "s", "method": "stats", "token": TOKEN})
    for _ in range(n):
        sock.send_multipart(stats)
    tally.add("hostile_adds")
    time.sleep(1.0)
    sock.close(0)


def oversize(address: str, tally: Tally, rng: random.Random) -> None:
    sock = raw(address)
    field, value = rng.choice([("seed", [0] * 400_000), ("policy", "x" * 500_000), ("blocks", {"a": [1] * 1000}),
                               ("rank_timeout_s", 1e-6), ("cuda_graphs", False), ("device", "cuda")])
    raw_add(sock, "big", {field: value})
    tally.add("hostile_adds")
    expect_refusal(sock, tally)
    sock.send_multipart([bytes([MessageType.UTILITY]), msgpack.packb({"id": "m", "method": "x" * 500_000,
                                                                      "token": TOKEN})])
    expect_refusal(sock, tally)
    sock.send_multipart([bytes([MessageType.ADD]), b"\xc1"])  # not msgpack
    expect_refusal(sock, tally)
    sock.send_multipart([bytes([MessageType.ADD]), b"x" * (2 << 20)])  # over the frame limit: dropped, no reply
    sock.close(linger=500)


def disconnect(address: str, tally: Tally, rng: random.Random) -> None:
    sock = raw(address)
    raw_add(sock, "gone", rng.choice(GREEDY + [LONG]), stream=rng.random() < 0.5)
    tally.add("hostile_adds")
    if rng.random() < 0.5:
        sock.poll(int(rng.uniform(0, 500)))
    sock.close(linger=1000)  # the ADD leaves, then the connection closes


def abort(address: str, tally: Tally) -> None:
    sock = raw(address)
    raw_add(sock, "a", LONG, stream=True)
    tally.add("hostile_adds")
    if sock.poll(30_000):
        first = decode(sock.recv_multipart())
        if first.type != MessageType.OUTPUT or first.body["kind"] != "progress":  # refused (busy, engine_dead)
            tally.code(first.body.get("code", "engine_dead"))
            sock.close(0)
            return
        sock.send_multipart(encode(MessageType.ABORT, {"id": "a", "token": TOKEN}))
        sock.send_multipart(encode(MessageType.ABORT, {"id": "never-sent", "token": TOKEN}))
        end = time.monotonic() + 60
        while time.monotonic() < end and sock.poll(int((end - time.monotonic()) * 1000)):
            message = decode(sock.recv_multipart())
            if message.type != MessageType.OUTPUT or message.body["kind"] != "progress":
                tally.code(message.body.get("code", "finished" if message.type == MessageType.OUTPUT else "engine_dead"))
                break
        else:
            tally.add("lost")
    sock.close(0)


def bad_token(address: str, url: str, tally: Tally) -> None:
    with Client(address, token="not-the-token-at-all", timeout_s=30) as client:
        try:
            client.generate(QUESTIONS[1], **GREEDY[0])
            tally.add("unauthorized_served")
        except Exception as e:  # noqa: BLE001 - counted by its code
            tally.code(getattr(e, "code", type(e).__name__))
    status, _ = post(url + "/v1/completions", {"prompt": QUESTIONS[1]}, token="wrong-token-wrong-token")
    tally.code(f"http_{status}")


def http_hostile(url: str, tally: Tally, rng: random.Random) -> None:
    host, port = url.removeprefix("http://").split(":")
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer "
            + TOKEN.encode() + b"\r\n")
    kind = rng.randrange(4)
    try:
        with socket.create_connection((host, int(port)), timeout=30) as s:
            if kind == 0:  # a 300 MB body announced, never sent
                s.sendall(head + b"Content-Length: 300000000\r\n\r\n")
            elif kind == 1:  # not UTF-8
                body = b'{"prompt": "\xff\xfe"}'
                s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            elif kind == 2:  # a body that never ends (held 2 s)
                s.sendall(head + b"Content-Length: 1000\r\n\r\n{\"pro")
                time.sleep(2)
                tally.code("http_slow_body")
                return
            else:  # a real request, then hang up mid-decode
                body = json.dumps({"prompt": QUESTIONS[2], **LONG}).encode()
                s.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
                time.sleep(rng.uniform(0.2, 1.0))
                tally.code("http_hung_up")
                return
            first = s.recv(64)
            tally.code(f"http_{first.split(b' ')[1].decode()}" if first else "http_closed")
    except OSError as e:
        tally.code(f"http_{type(e).__name__}")


def hostile_loop(index: int, address: str, url: str, tally: Tally, stop: threading.Event, flood_n: int) -> None:
    rng = random.Random(1000 + index)
    acts = [lambda: flood(address, tally, flood_n), lambda: oversize(address, tally, rng),
            lambda: disconnect(address, tally, rng), lambda: abort(address, tally),
            lambda: bad_token(address, url, tally), lambda: http_hostile(url, tally, rng)]
    turn = index
    while not stop.is_set():
        try:
            acts[turn % len(acts)]()
        except Exception as e:  # noqa: BLE001 - a hostile client's own failure is not the server's
            tally.code(f"hostile_{type(e).__name__}")
        turn += 1
        time.sleep(rng.uniform(0.05, 0.3))


# --- the run --------------------------------------------------------------------------------------


def start_server(args, folder: Path):
    address, port = f"tcp://127.0.0.1:{free_port()}", free_port()
    (folder / "token").write_text(TOKEN)
    command = [sys.executable, "-m", "paradec", "serve", "--model", args.model, "--address", address,
               "--http-port", str(port), "--token-file", str(folder / "token"), "--nproc", str(args.nproc),
               "--max-pending", str(args.max_pending), "--stall-timeout-s", str(args.stall_timeout_s),
               "--request-timeout-s", "60"] + (["--device", args.device] if args.device else [])
    log = open(folder / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"paradec serve exited: {(folder / 'serve.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return process, address, url
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("paradec serve did not become healthy in 300 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="paradec-tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--duration-s", type=float, default=60.0, help="how long the clients run")
    p.add_argument("--hostile", type=int, default=8, help="misbehaving clients")
    p.add_argument("--good", type=int, default=16, help="well-behaved clients (a quarter over HTTP)")
    p.add_argument("--nproc", type=int, default=1, help="engine ranks")
    p.add_argument("--max-pending", type=int, default=64)
    p.add_argument("--stall-timeout-s", type=float, default=60.0,
                   help="the server's: above the longest step (with --nproc: the longest batch) on a busy host")
    p.add_argument("--flood", type=int, default=20_000, help="unread stats requests per flood")
    args = p.parse_args()
    info = banner()
    folder = Path(tempfile.mkdtemp(prefix="paradec-chaos-"))
    tally, hostile, last_burst = Tally(), Tally(), Tally()  # well-behaved, misbehaving, the burst at SIGTERM
    process, address, url = start_server(args, folder)
    family: dict = {}
    crashed = False
    with Client(address, token=TOKEN, timeout_s=30) as admin:
        family.update(descendants(process.pid))
        stop = threading.Event()
        threads = [threading.Thread(target=good_loop, args=(i, address, url, tally, stop), daemon=True)
                   for i in range(args.good)]
        threads += [threading.Thread(target=hostile_loop, args=(i, address, url, hostile, stop, args.flood), daemon=True)
                    for i in range(args.hostile)]
        start = time.monotonic()
        for t in threads:
            t.start()
        killed = None
        while time.monotonic() - start < args.duration_s:
            time.sleep(1.0)
            family.update(descendants(process.pid))
            if process.poll() is not None:
                crashed = True
                break
            if killed is None and time.monotonic() - start > args.duration_s * 0.4:
                killed = admin.health()["engine_pid"]
                os.kill(killed, signal.SIGKILL)  # the engine dies mid-run: the server restarts it
                print(f"killed the engine (pid {killed}) at {time.monotonic() - start:.1f} s")
        stop.set()
        for t in threads:
            t.join(120)
        hung_clients = sum(t.is_alive() for t in threads)
        # quiescence: nothing in flight, the counters add up
        drained = quiet_stats = None
        if not crashed:
            end = time.monotonic() + 60
            while time.monotonic() < end:
                quiet_stats = admin.stats()
                if quiet_stats["in_flight"] == 0:
                    drained = True
                    break
                time.sleep(0.5)
            end = time.monotonic() + 120  # a restart may still be loading the model
            while not (health := admin.health())["healthy"] and time.monotonic() < end:
                time.sleep(0.5)
            family.update(descendants(process.pid))
        # the last burst, then SIGTERM
        burst: list = []
        burst_threads = []
        if not crashed:
            def last(i):
                client = GoodZmq(address, last_burst, f"last{i}")
                burst.append(client.request(i % len(QUESTIONS), LONG, timeout_s=60))
                client.drain(0.5)
                client.close()

            burst_threads = [threading.Thread(target=last, args=(i,), daemon=True) for i in range(8)]
            for t in burst_threads:
                t.start()
            end = time.monotonic() + 30
            while admin.stats()["in_flight"] < 8 and time.monotonic() < end:
                time.sleep(0.05)
            family.update(descendants(process.pid))
    sigterm_at = time.monotonic()
    process.send_signal(signal.SIGTERM)
    try:
        exit_code = process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        exit_code = process.wait()
    shutdown_s = time.monotonic() - sigterm_at
    for t in burst_threads:
        t.join(30)
    orphan_deadline = time.monotonic() + 5
    while survivors(family) and time.monotonic() < orphan_deadline:
        time.sleep(0.1)
    orphans = survivors(family)
    for pid in orphans:  # leave nothing behind, whatever the count says
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # well-behaved results against a direct generate()
    model = paradec.load(args.model, device=args.device)
    direct: dict = {}
    mismatches = collections.Counter()
    for transport, question, settings, result in tally.results:
        key = (question, json.dumps(settings, sort_keys=True))
        if key not in direct:
            direct[key] = paradec.generate(model, QUESTIONS[question], **settings)
        expected = direct[key]
        same = (result["token_ids"] == expected.token_ids if transport == "zmq"
                else result["summary"] == expected.summary and result["blocks"] == expected.blocks)
        if not same:
            mismatches["greedy" if settings.get("temperature", 0) == 0 else "sampled"] += 1

    stats = quiet_stats or {}
    outcomes = ("finished", "errors", "aborted", "timeout", "stalled", "engine_dead", "shutting_down",
                "disconnected", "undelivered")
    gap = stats.get("accepted", 0) - sum(stats.get(k, 0) for k in outcomes) - stats.get("in_flight", 0)
    greedy_checked = sum(1 for _, _, s, _ in tally.results if s.get("temperature", 0) == 0)
    row = {
        "duration_s": args.duration_s, "hostile_clients": args.hostile, "good_clients": args.good,
        "nproc": args.nproc,
        "good_requests": tally.counts["requests"], "good_results": tally.counts["results"],
        "good_errors_by_code": dict(sorted(tally.codes.items())),
        "hostile_adds": hostile.counts["hostile_adds"], "hostile_replies_by_code": dict(sorted(hostile.codes.items())),
        "lost": sum(t.counts["lost"] for t in (tally, hostile, last_burst)),
        "duplicated": tally.counts["duplicated"] + last_burst.counts["duplicated"],
        "stray": tally.counts["stray"] + last_burst.counts["stray"],
        "bad_token_served": hostile.counts["unauthorized_served"],
        "server_accepted": stats.get("accepted"), "server_outcomes": {k: stats.get(k) for k in outcomes},
        "server_refused": {k: stats.get(k) for k in ("invalid", "unauthorized", "busy", "unavailable")},
        "leaked_slots": (stats.get("in_flight", 0) if drained else "not drained") if not crashed else "crashed",
        "accounting_gap": gap, "restarts": stats.get("restarts"), "healthy_after": health["healthy"] if not crashed else False,
        "crashes": int(crashed), "hung_clients": hung_clients,
        "last_burst": dict(collections.Counter(burst)), "exit_code": exit_code, "shutdown_s": round(shutdown_s, 2),
        "orphans": len(orphans), "orphan_commands": list(orphans.values()),
        "greedy_checked": greedy_checked, "sampled_checked": len(tally.results) - greedy_checked,
        "greedy_mismatches": mismatches["greedy"], "sampled_mismatches": mismatches["sampled"],
    }
    print(f"\n{args.model}, {args.duration_s:g} s, {args.hostile} hostile + {args.good} well-behaved clients, "
          f"nproc {args.nproc}, engine killed at {args.duration_s * 0.4:.0f} s, SIGTERM at the end")
    width = max(map(len, row))
    for key, value in row.items():
        print(f"| {key:<{width}} | {value} |")
    emit_json({"benchmark": "serve_chaos", **info, **row})


if __name__ == "__main__":
    main()
