"""Clients of a paradec server: ``Client`` (blocking) and ``AsyncClient`` (asyncio). Both take
the same config as ``paradec.generate`` (a GenerationConfig and/or overrides), stream per-step
progress (tokens committed per block, so a UI can draw the canvas filling in), abort, and time out.

    from paradec.serve import Client

    with Client("tcp://127.0.0.1:5555") as client:
        result = client.generate("Zoe has 30 apples ...", blocks=4, on_progress=print)

A request carries request-level settings only (``protocol.REQUEST_SETTINGS``); process settings
(``rank_timeout_s``, ``prompt_kv``, ``gather``, ``results_on``, ``cuda_graphs``) are the server's,
and the server refuses a request that sets them. A message too large for one frame is refused
here, before it is sent (``ProtocolError`` ``too_large``): the server would drop the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass

import zmq
import zmq.asyncio

from paradec.config import GenerationConfig
from paradec.config.generation import DEFAULTS, merged_settings, plain_value
from paradec.errors import ParadecError
from paradec.serve.protocol import REQUEST_SETTINGS, Message, MessageType, ProtocolError, decode, encode


GRACE_S = 1.0  # a request's timeout_s is the server's to enforce; the client waits this much longer, then aborts


class ServeError(ParadecError):
    """The server refused or failed a request; ``code`` is the ERROR's code (busy, invalid,
    unauthorized, aborted, timeout, failed, too_large, stalled, shutting_down) or ``engine_dead``;
    ``message`` is the server's text."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class EngineDead(ServeError):
    """The engine died or is not up; ``restarting``: the server is starting one (worth a retry)."""

    def __init__(self, message: str, restarting: bool = False):
        super().__init__("engine_dead", message)
        self.restarting = restarting


@dataclass
class Progress:
    id: str
    step: int
    committed: list[int]  # tokens committed so far in each block (think blocks, then the summary)
    lengths: list[int]  # each block's body length


@dataclass
class Accepted:
    """The engine queued the request (``AsyncClient.stream(accepted=True)``): nothing refused it."""

    id: str


@dataclass
class ServedResult:
    """What ``paradec.generate`` returns, as it crossed the wire."""

    id: str
    blocks: list[str]
    summary: str
    answer: str | None
    token_ids: list[int]
    trace: list[int]
    nfe: int
    steps: int
    timings: dict
    prompt_tokens: int
    block_tokens: list[int]
    summary_tokens: int
    engine_s: dict  # seconds in the engine: "queued" (arrival to its batch's start), "generate" (its batch)
    text: str | None = None  # the answer text (the summary in nap), cut before a stop string; None: the summary
    finish_reason: str = "length"  # "stop": an EOS or a stop string ended the text; "length": it filled its region
    text_tokens: int | None = None  # the text's tokens; None: summary_tokens

    def __post_init__(self) -> None:
        if self.text is None:
            self.text = self.summary
        if self.text_tokens is None:
            self.text_tokens = self.summary_tokens


def request_body(request_id: str, prompt, config: GenerationConfig | None, overrides: dict, stream: bool,
                 timeout_s: float | None, token: str | None, accepted: bool = False) -> tuple[dict, list]:
    """An ADD body and its buffers: text prompts as text, token ids as an int32 buffer, chat as
    ``messages``. The settings are what ``paradec.generate(model, prompt, config, **overrides)``
    would decode with, the server's model supplying what they leave unset: a GenerationConfig
    with the overrides applied here as ``generate`` applies them, then its request settings sent
    whole (its process settings only where they differ from the defaults, for the server to
    refuse by name; threshold and factor only under their policy); a mapping (settings, as
    ``generate`` takes it; a name in it and in the overrides is refused) and the overrides as
    given, less process settings at their defaults (a whole ``asdict(config)`` dump)."""
    if isinstance(config, GenerationConfig):
        config = GenerationConfig.build(config, **overrides)  # reconciled as generate() does (ConfigError here)
        settings = {k: _wire_value(v) for k, v in dataclasses.asdict(config).items()
                    if k in REQUEST_SETTINGS or not _at_default(k, v)}
        for name in ("threshold", "factor"):  # the policy's own parameter only
            if config.policy != name:
                settings.pop(name)
    else:
        given = merged_settings(config, overrides) if isinstance(config, Mapping) else dict(overrides)
        given = {k: _wire_value(v) for k, v in given.items()}
        settings = {k: v for k, v in given.items() if k in REQUEST_SETTINGS or not _at_default(k, v)}
    body = {"id": request_id, "config": settings, "stream": stream}
    buffers = []
    if isinstance(prompt, str):
        body["prompt"] = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        body["messages"] = prompt
    else:
        buffers = [list(prompt)]
    if timeout_s is not None:
        body["timeout_s"] = float(timeout_s)
    if token is not None:
        body["token"] = token
    if accepted:
        body["accepted"] = True
    return body, buffers


def _wire_value(value):
    """A setting as the wire carries it: numpy and 0-d tensor numbers as Python numbers (as
    ``generate`` takes them), a tuple (``stop=("a", "b")``, a config's stop) as a list."""
    if isinstance(value, tuple):
        return [plain_value(v) for v in value]
    return plain_value(value)


def _at_default(name: str, value) -> bool:
    """Whether ``value`` is GenerationConfig's default for ``name`` (a plain value equal to it)."""
    default = DEFAULTS.get(name, ...)
    plain = isinstance(value, (bool, int, float, str, type(None)))
    return plain and isinstance(value, bool) == isinstance(default, bool) and value == default


def _event(message: Message) -> Progress | ServedResult | dict:
    """A decoded server message as progress, a result or a utility reply; errors raise."""
    body = message.body
    if message.type == MessageType.ENGINE_DEAD:
        raise EngineDead(body["message"], body.get("restarting", False))
    if message.type == MessageType.ERROR:
        raise ServeError(body["code"], body["message"])
    if body["kind"] == "progress":
        return Progress(body["id"], body["step"], body["committed"], body["lengths"])
    if body["kind"] == "accepted":
        return Accepted(body["id"])
    if body["kind"] == "utility":
        return body["reply"]
    token_ids, trace = (b.tolist() for b in message.buffers)
    return ServedResult(id=body["id"], token_ids=token_ids, trace=trace, **body["result"])


def _ends(message: Message) -> bool:
    """Whether ``message`` is its request's last (a result, an ERROR or ENGINE_DEAD; not progress)."""
    return message.type != MessageType.OUTPUT or message.body["kind"] not in ("progress", "accepted")


class Client:
    """A blocking client; one request at a time per client (use one client per thread)."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float | None = None):
        self.address, self.token, self.timeout_s = address, token or os.environ.get("PARADEC_TOKEN"), timeout_s
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.ids = (f"{os.getpid()}-{id(self):x}-{i}" for i in itertools.count())

    def generate(self, prompt, config: GenerationConfig | None = None, timeout_s: float | None = None,
                 on_progress: Callable[[Progress], None] | None = None, **overrides) -> ServedResult:
        """Decodes one prompt (text, token ids, or chat messages) on the server. on_progress gets
        every step's Progress. Raises ServeError (EngineDead when the engine died) or
        ServeError ``timeout`` when ``timeout_s`` (default: the client's) passes — the server
        enforces it from the request's arrival — or TimeoutError (after sending ABORT) when no
        answer came GRACE_S after that (the server or the connection is gone)."""
        for event in self.stream(prompt, config, timeout_s, progress=on_progress is not None, **overrides):
            if isinstance(event, Progress):
                on_progress(event)
            else:
                return event
        raise AssertionError("unreachable: a stream ends with its result")

    def stream(self, prompt, config: GenerationConfig | None = None, timeout_s: float | None = None,
               progress: bool = True, **overrides) -> Iterator[Progress | ServedResult]:
        """Progress events (with ``progress``), then the result. Leaving the stream before its
        result (``break``, ``close()``, an exception) aborts the request at the server."""
        request_id = next(self.ids)
        timeout_s = timeout_s if timeout_s is not None else self.timeout_s
        body, buffers = request_body(request_id, prompt, config, overrides, progress, timeout_s, self.token)
        self.socket.send_multipart(encode(MessageType.ADD, body, buffers))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s + GRACE_S  # the server's ERROR first
        live = True  # until the server ended it: leaving before then aborts it there
        try:
            while live:
                message = self._receive(request_id, deadline)
                live = not _ends(message)
                yield _event(message)
        finally:
            if live and not self.socket.closed:  # closed: close() came first, the server drops its requests
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self.socket.send_multipart(encode(MessageType.ABORT, self._with_token({"id": request_id})))

    def health(self, timeout_s: float = 10.0) -> dict:
        return self._utility("health", timeout_s)

    def stats(self, timeout_s: float = 10.0) -> dict:
        return self._utility("stats", timeout_s)

    def _utility(self, method: str, timeout_s: float) -> dict:
        request_id = next(self.ids)
        self.socket.send_multipart(encode(MessageType.UTILITY, self._with_token({"id": request_id, "method": method})))
        return _event(self._receive(request_id, time.monotonic() + timeout_s))

    def _with_token(self, body: dict) -> dict:
        return {**body, "token": self.token} if self.token is not None else body

    def _receive(self, request_id: str, deadline: float | None) -> Message:
        """The next message for ``request_id``; others (a request left earlier) are dropped."""
        while True:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.socket.poll(None if wait is None else int(wait * 1000)):
                raise TimeoutError(f"request {request_id} got no answer in time")  # a stream aborts it
            message = decode(self.socket.recv_multipart())
            if message.id in (request_id, None):  # None: an ERROR about a message the server could not read
                return message

    def close(self) -> None:
        self.socket.close(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient:
    """An asyncio client; any number of requests at once, on one event loop at a time (a later
    loop may take it over once the earlier one is closed: ``asyncio.run`` per call works).

    ``request_id`` is the caller's name for a request, unique among this client's requests in
    flight; on the wire each request gets an id of its own, never reused, so a request that was
    left (cancelled, aborted, its stream closed) can never answer a later one of the same name.
    Leaving a stream before its result aborts the request at the server."""

    def __init__(self, address: str, token: str | None = None, timeout_s: float | None = None):
        self.address, self.token, self.timeout_s = address, token or os.environ.get("PARADEC_TOKEN"), timeout_s
        self.context = zmq.asyncio.Context.instance()
        self.ids = (f"a{os.getpid()}-{id(self):x}-{i}" for i in itertools.count())  # wire ids
        self.reader: asyncio.Task | None = None
        self._connect()

    def _connect(self) -> None:
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)  # many requests share it (HTTP): never the slow reader
        self.socket.connect(self.address)
        self.queues: dict[str, asyncio.Queue] = {}  # wire id -> its messages
        self.requests: dict[str, str] = {}  # the caller's request_id -> its wire id, while its stream runs

    async def _read(self) -> None:
        while True:
            frames = await self.socket.recv_multipart()
            try:
                message = decode(frames)
            except ProtocolError:  # not from a paradec server: nothing to route
                continue
            queue = self.queues.get(message.id)
            if queue is not None:
                queue.put_nowait(message)
            # id None: the server could not read one of this client's messages, and cannot say which.
            # Every message is checked before it is sent, so this is rare; it is not broadcast (one
            # request's fault would end all of them): that request ends at its deadline. A wire id
            # without a queue: a request that was left (aborted); its last messages are dropped.

    def _open(self, wire_id: str, request_id: str | None = None) -> asyncio.Queue:
        """``wire_id``'s queue (and ``request_id`` named as it, refused while in flight), the
        reader running on this event loop. The reader of an earlier loop that is closed (or a
        reader that ended) is replaced, with a new connection: the old one's requests died with
        their loop. An earlier loop still open keeps the client."""
        loop = asyncio.get_running_loop()
        if self.reader is None or self.reader.done() or self.reader.get_loop() is not loop:
            if self.reader is not None and not self.reader.done() and not self.reader.get_loop().is_closed():
                raise RuntimeError("this AsyncClient is in use on another event loop that is still open; "
                                   "use one client per event loop (or close that loop first)")
            if self.reader is not None:
                self.socket.close(linger=0)
                self._connect()
            self.reader = loop.create_task(self._read())
        if request_id is not None:
            if request_id in self.requests:
                raise ServeError("invalid", f"request {request_id!r} is already in flight on this client")
            self.requests[request_id] = wire_id
        self.queues[wire_id] = asyncio.Queue()
        return self.queues[wire_id]

    async def stream(self, prompt, config: GenerationConfig | None = None, timeout_s: float | None = None,
                     progress: bool = True, request_id: str | None = None, accepted: bool = False,
                     **overrides) -> AsyncIterator[Progress | ServedResult | Accepted]:
        """Progress events (with ``progress``), then the result; events carry ``request_id``
        (default: a fresh one). With ``accepted``, first an ``Accepted`` event once the engine
        queued the request (past every refusal; a full engine's queue may hold it a while before
        its first step). Leaving early (``break``, ``aclose()``, cancelled) aborts it."""
        wire_id = next(self.ids)
        request_id = request_id or wire_id
        timeout_s = timeout_s if timeout_s is not None else self.timeout_s
        body, buffers = request_body(wire_id, prompt, config, overrides, progress, timeout_s, self.token, accepted)
        frames = encode(MessageType.ADD, body, buffers)  # refused here when it is malformed or too large
        queue = self._open(wire_id, request_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s + GRACE_S  # the server's ERROR first
        live = True  # until the server ended it: leaving before then aborts it there
        try:
            await self.socket.send_multipart(frames)
            while live:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    message = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    raise TimeoutError(f"request {request_id} got no answer in time (aborted)") from None
                live = not _ends(message)
                if not live:  # its name is free once its last message is out, whenever the stream is closed
                    self._release(wire_id, request_id)
                message.body["id"] = request_id
                yield _event(message)
        finally:
            self._release(wire_id, request_id)
            if live and not self.socket.closed:  # closed: close() came first, the server drops its requests
                await self._send_abort(wire_id)

    async def generate(self, prompt, config: GenerationConfig | None = None, timeout_s: float | None = None,
                       on_progress: Callable[[Progress], None] | None = None, request_id: str | None = None,
                       **overrides) -> ServedResult:
        events = self.stream(prompt, config, timeout_s, progress=on_progress is not None, request_id=request_id,
                             **overrides)
        async with contextlib.aclosing(events):  # (closed on return, not at the next garbage collection)
            async for event in events:
                if isinstance(event, Progress):
                    on_progress(event)
                else:
                    return event
        raise AssertionError("unreachable: a stream ends with its result")

    def _release(self, wire_id: str, request_id: str) -> None:
        """Forgets a request's queue and its name (the name only while it is still this request's)."""
        self.queues.pop(wire_id, None)
        if self.requests.get(request_id) == wire_id:
            del self.requests[request_id]

    async def abort(self, request_id: str) -> None:
        """Stops ``request_id`` (its stream then raises ServeError ``aborted``, or gets its
        result if it finished first); a request not in flight on this client: nothing to do."""
        if request_id in self.requests:
            await self._send_abort(self.requests[request_id])

    async def _send_abort(self, wire_id: str) -> None:
        body = {"id": wire_id, **({"token": self.token} if self.token is not None else {})}
        await self.socket.send_multipart(encode(MessageType.ABORT, body))

    async def health(self, timeout_s: float = 10.0) -> dict:
        return await self._utility("health", timeout_s)

    async def stats(self, timeout_s: float = 10.0) -> dict:
        return await self._utility("stats", timeout_s)

    async def _utility(self, method: str, timeout_s: float) -> dict:
        request_id = next(self.ids)
        queue = self._open(request_id)
        body = {"id": request_id, "method": method, **({"token": self.token} if self.token is not None else {})}
        try:
            await self.socket.send_multipart(encode(MessageType.UTILITY, body))
            return _event(await asyncio.wait_for(queue.get(), timeout_s))
        finally:
            self.queues.pop(request_id, None)

    def close(self) -> None:
        if self.reader is not None and not self.reader.done() and not self.reader.get_loop().is_closed():
            self.reader.cancel()
        self.socket.close(linger=0)
