"""The frontend: the process clients talk to. It starts the engine, binds a ROUTER for clients
(``address``), a ROUTER the engine's DEALER connects to for requests and a PULL its PUSH
connects to for outputs, and routes messages between them.

It validates every client message (schema, size, the shared-secret token), keeps the bounded
table of requests in flight (a full table answers ``busy``; nothing is dropped silently), maps
each client's request ids to its own, forwards outputs to the client that asked, and watches
the engine process: when it dies every request in flight gets ENGINE_DEAD, the frontend stays
up, reports unhealthy and answers new requests with ENGINE_DEAD. A client that vanished
(ZeroMQ cannot deliver to it) has its requests aborted at the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import multiprocessing
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from paradec.serve.engine import ENGINE_IDENTITY, run_engine
from paradec.serve.protocol import Limits, Message, MessageType, ProtocolError, decode, encode

log = logging.getLogger(__name__)
LOOPBACK = ("tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")


def check_bind(address: str, token: str | None) -> None:
    """Loopback (or ipc) by default; any other address needs a shared-secret token."""
    if not address.startswith(LOOPBACK) and not token:
        raise ProtocolError(f"binding {address} (not loopback) needs a shared-secret token (--token / "
                            f"PARADEC_TOKEN); every client must then send it", code="unauthorized")


@dataclass
class Flight:
    client: bytes  # the client's ZeroMQ identity
    client_id: str  # the id the client gave the request
    started: float = field(default_factory=time.monotonic)


class Frontend:
    def __init__(self, address: str, engine_target, token: str | None = None, max_pending: int = 64,
                 limits: Limits = Limits(), ready_timeout_s: float = 600.0):
        """engine_target(requests_address, outputs_address): the engine process's entry point
        (called in a spawned process)."""
        check_bind(address, token)
        self.address, self.token, self.max_pending, self.limits = address, token, max_pending, limits
        self.engine_target, self.ready_timeout_s = engine_target, ready_timeout_s
        self.context = zmq.asyncio.Context()
        self.folder = tempfile.mkdtemp(prefix="paradec-")  # ipc sockets in a private folder (0700)
        self.engine_requests_address = f"ipc://{self.folder}/requests"
        self.engine_outputs_address = f"ipc://{self.folder}/outputs"
        self.flights: dict[str, Flight] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self.ids = itertools.count()
        self.engine_alive = False
        self.engine_ready = asyncio.Event()
        self.engine: multiprocessing.Process | None = None
        self.stats = {"accepted": 0, "finished": 0, "errors": 0, "aborted": 0, "busy": 0, "invalid": 0,
                      "unauthorized": 0, "engine_dead": 0, "disconnected": 0}

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.clients = self._socket(zmq.ROUTER, self.address)
        self.to_engine = self._socket(zmq.ROUTER, self.engine_requests_address)
        self.from_engine = self._socket(zmq.PULL, self.engine_outputs_address)
        ctx = multiprocessing.get_context("spawn")
        self.engine = ctx.Process(target=self.engine_target,
                                  args=(self.engine_requests_address, self.engine_outputs_address), daemon=True)
        self.engine.start()
        self.engine_alive = True
        self.tasks = [asyncio.create_task(self._outputs()), asyncio.create_task(self._watch_engine())]
        try:
            await asyncio.wait_for(self.engine_ready.wait(), self.ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the engine did not start within {self.ready_timeout_s} s") from None
        if not self.engine_alive:
            raise RuntimeError(f"the engine exited while starting (code {self.engine.exitcode})")
        self.tasks.append(asyncio.create_task(self._clients()))
        log.info("serving on %s (engine pid %d)", self.address, self.engine.pid)

    def _socket(self, kind: int, address: str):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable peer raises instead of dropping
        if kind in (zmq.ROUTER, zmq.PULL):  # per frame: a larger one drops the sender's connection
            sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes + 1024)
        sock.bind(address)
        return sock

    async def stop(self) -> None:
        for task in getattr(self, "tasks", []):
            task.cancel()
        if self.engine is not None and self.engine.is_alive():
            self.engine.terminate()
            self.engine.join(5)
        self.context.destroy(linger=0)
        shutil.rmtree(self.folder, ignore_errors=True)

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self.tasks)
        finally:
            await self.stop()

    # --- clients -> engine -------------------------------------------------------------------
    async def _clients(self) -> None:
        while True:
            identity, *frames = await self.clients.recv_multipart()
            try:
                try:
                    message = decode(frames, self.limits)
                    self._authorise(message)
                except ProtocolError as e:
                    self.stats["unauthorized" if e.code == "unauthorized" else "invalid"] += 1
                    await self._reply(identity, MessageType.ERROR, {"id": _id_of(frames, self.limits), "code": e.code,
                                                                   "message": str(e)})
                    continue
                await self._from_client(identity, message)
            except Exception:  # noqa: BLE001 - no client message may stop the frontend
                log.exception("a client message could not be handled")

    def _authorise(self, message: Message) -> None:
        given = message.body.pop("token", None)
        if self.token and not (isinstance(given, str)
                               and hmac.compare_digest(given.encode("utf-8"), self.token.encode("utf-8"))):
            raise ProtocolError("a missing or wrong token", code="unauthorized")
        if message.type in (MessageType.OUTPUT, MessageType.ERROR, MessageType.ENGINE_DEAD):
            raise ProtocolError(f"clients do not send {message.type.name} messages")

    async def _from_client(self, identity: bytes, message: Message) -> None:
        client_id = message.id
        if message.type == MessageType.UTILITY:
            reply = self.health() if message.body["method"] == "health" else {**self.stats, "in_flight": len(self.flights)}
            return await self._reply(identity, MessageType.OUTPUT, {"id": client_id, "kind": "utility", "reply": reply})
        key = (identity, client_id)
        if message.type == MessageType.ABORT:
            internal = self.by_client.get(key)
            if internal is not None:  # unknown or finished ids: nothing to stop
                await self._to_engine(MessageType.ABORT, {"id": internal})
            return
        if not self.engine_alive:
            self.stats["engine_dead"] += 1
            return await self._reply(identity, MessageType.ENGINE_DEAD, {"id": client_id, "message": self._dead_reason()})
        if key in self.by_client:  # id null: an ERROR with this id would read as the live request's final
            self.stats["invalid"] += 1
            return await self._reply(identity, MessageType.ERROR, {"id": None, "code": "invalid",
                                                                  "message": f"request {client_id!r} is already in flight"})
        if len(self.flights) >= self.max_pending:
            self.stats["busy"] += 1
            return await self._reply(identity, MessageType.ERROR, {"id": client_id, "code": "busy", "message":
                                     f"{len(self.flights)} requests in flight, the limit is {self.max_pending}; retry later"})
        internal = f"r{next(self.ids)}"
        self.flights[internal] = Flight(identity, client_id)
        self.by_client[key] = internal
        self.stats["accepted"] += 1
        if not await self._to_engine(MessageType.ADD, {**message.body, "id": internal}, message.buffers):
            self._close(internal)
            self.stats["errors"] += 1
            await self._reply(identity, MessageType.ERROR, {"id": client_id, "code": "failed",
                                                           "message": "the engine could not be reached"})

    async def _to_engine(self, kind: MessageType, body: dict, buffers=None, patience_s: float = 2.0) -> bool:
        """Sends to the engine; False when it cannot be reached within ``patience_s`` (its
        DEALER may still be connecting right after start; a dead engine the watcher reports)."""
        frames = [ENGINE_IDENTITY, *encode(kind, body, buffers)]
        deadline = time.monotonic() + patience_s
        while True:
            try:
                await self.to_engine.send_multipart(frames)
                return True
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline or not self.engine_alive:
                    log.warning("could not reach the engine: %s", e)
                    return False
                await asyncio.sleep(0.01)

    async def _reply(self, identity: bytes, kind: MessageType, body: dict, buffers=None) -> bool:
        """Sends to one client; False when it cannot be reached (it disconnected)."""
        try:
            await self.clients.send_multipart([identity, *encode(kind, body, buffers)])
            return True
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            return False

    # --- engine -> clients -------------------------------------------------------------------
    async def _outputs(self) -> None:
        while True:
            frames = await self.from_engine.recv_multipart()
            try:
                message = decode(frames, self.limits)
            except ProtocolError as e:
                log.error("the engine sent a malformed message: %s", e)
                continue
            if message.type == MessageType.OUTPUT and message.body["kind"] == "ready":
                self.engine_ready.set()
                continue
            flight = self.flights.get(message.id)
            if flight is None:
                continue  # a request the frontend already closed (its client vanished, or the engine died)
            final = message.type != MessageType.OUTPUT or message.body["kind"] == "final"
            if final:
                self._close(message.id)
                code = message.body.get("code")
                self.stats["finished" if code is None else ("aborted" if code == "aborted" else "errors")] += 1
            delivered = await self._reply(flight.client, message.type, {**message.body, "id": flight.client_id},
                                          message.buffers)
            if not delivered and not final:  # the client is gone: stop decoding for it
                self._close(message.id)
                self.stats["disconnected"] += 1
                await self._to_engine(MessageType.ABORT, {"id": message.id})

    def _close(self, internal: str) -> None:
        flight = self.flights.pop(internal)
        self.by_client.pop((flight.client, flight.client_id), None)

    async def _watch_engine(self) -> None:
        while self.engine.is_alive():
            await asyncio.sleep(0.1)
        self.engine_alive = False
        self.engine_ready.set()  # wake a start() still waiting
        reason = self._dead_reason()
        log.error("%s", reason)
        for internal, flight in list(self.flights.items()):
            self._close(internal)
            self.stats["engine_dead"] += 1
            await self._reply(flight.client, MessageType.ENGINE_DEAD, {"id": flight.client_id, "message": reason})

    def _dead_reason(self) -> str:
        code = self.engine.exitcode if self.engine is not None else None
        return f"the engine process exited (code {code}); the frontend is up but cannot decode"

    def health(self) -> dict:
        return {"healthy": self.engine_alive, "engine_pid": self.engine.pid if self.engine else None,
                "in_flight": len(self.flights), "max_pending": self.max_pending}


def _id_of(frames: list[bytes], limits: Limits) -> str | None:
    """The id of a message that failed validation, when its body still reads as a map with one."""
    import msgpack

    try:
        body = msgpack.unpackb(frames[1], raw=False) if len(frames) > 1 else None
    except Exception:  # noqa: BLE001 - any undecodable body: no id to echo
        return None
    value = body.get("id") if isinstance(body, dict) else None
    return value if isinstance(value, str) and 0 < len(value) <= limits.max_id_chars else None


class BackgroundFrontend:
    """A frontend on its own event-loop thread (embedding paradec in a process that has its own
    main loop, tests, benchmarks): started on construction, ``stop()`` ends it and its engine."""

    def __init__(self, frontend_args: tuple, frontend_kwargs: dict, start_timeout_s: float = 600.0):
        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.error: BaseException | None = None
        self.frontend_args, self.frontend_kwargs = frontend_args, frontend_kwargs
        threading.Thread(target=self._run, daemon=True, name="paradec-frontend").start()
        if not self.started.wait(start_timeout_s):
            raise RuntimeError(f"the frontend did not start within {start_timeout_s} s")
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.frontend = Frontend(*self.frontend_args, **self.frontend_kwargs)
        try:
            self.loop.run_until_complete(self.frontend.start())
        except BaseException as e:  # noqa: BLE001 - raised again in the constructing thread
            self.error = e
        self.started.set()
        self.loop.run_forever()

    @property
    def address(self) -> str:
        return self.frontend.address

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.frontend.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


class EngineTarget:
    """A picklable engine entry point for the spawned engine process. model: a checkpoint
    directory or built-in name, or a picklable callable ``model(device) -> DiffusionModel``
    (random weights for benchmarks; one process only)."""

    def __init__(self, model, max_batch: int = 8, device: str | None = None, limits: Limits = Limits(),
                 nproc: int = 1):
        self.model, self.max_batch, self.device, self.limits, self.nproc = model, max_batch, device, limits, nproc

    def __call__(self, requests_address: str, outputs_address: str) -> None:
        if self.nproc == 1:
            run_engine(self.model, requests_address, outputs_address, self.max_batch, self.device, self.limits)
        else:
            from paradec.serve.ranks import run_ranks

            run_ranks(self.nproc, self.model, requests_address, outputs_address, self.max_batch, self.device,
                      self.limits)
