"""The frontend: the process clients talk to. It starts the engine, binds a ROUTER for clients
(``address``), a ROUTER the engine's DEALER connects to for requests and a PULL its PUSH
connects to for outputs, and routes messages between them.

It validates every client message (schema, size, the shared-secret token, the allow-list of
request settings) before anything is forwarded, keeps the bounded table of requests in flight
(a full table answers ``busy``; nothing is dropped silently), maps each client's request ids to
its own and forwards outputs to the client that asked. It never trusts the transport: every send
to a client is non-blocking, and a client that cannot take a message (vanished, or a reader too
slow for its queue) costs that client its replies — its requests are aborted at the engine, it
is logged once — never an exception out of a loop.

Every accepted request ends with exactly one final message, and the frontend enforces that
itself: the request's deadline (``timeout_s``, else ``request_timeout_s``) runs from its arrival
here; the engine's liveness is its *progress* (a count of steps and messages it reports), so an
engine that is alive but stuck (``SIGSTOP``, a hung kernel) with work pending fails its requests
with ``stalled`` after ``stall_timeout_s``; an engine that dies fails them with ENGINE_DEAD. Either
way the engine is killed (with every rank it started) and, with ``restart``, started again;
until it is ready ``health`` says unhealthy and new requests get ENGINE_DEAD. ``stop()`` answers
every request in flight with ``shutting_down`` and ends the engine and its ranks.

Counters (``stats``): requests the frontend refuses (``invalid``, ``unauthorized``, ``busy``,
``unavailable``: no engine) are not accepted; every accepted request ends as exactly one of
``finished`` (result delivered), ``refused`` (the engine refused its settings or prompt, ERROR
invalid or too_large, before queuing it), ``errors`` (it failed once queued), ``aborted``,
``timeout``, ``stalled``, ``engine_dead``, ``shutting_down`` (each: that ERROR delivered),
``disconnected`` (its client could not take a progress message: aborted) or ``undelivered`` (its
final message could not be delivered), so ``accepted`` equals their sum plus ``in_flight``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import math
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import zmq
import zmq.asyncio

from paradec.errors import CheckpointError, ConfigError, InputError
from paradec.serve.engine import ENGINE_IDENTITY, run_engine
from paradec.serve.process import die_with_parent, kill_group
from paradec.serve.protocol import OUTCOMES, REFUSALS, Limits, Message, MessageType, ProtocolError, decode, encode

log = logging.getLogger(__name__)
LOOPBACK = ("tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")
MIN_TOKEN_CHARS = 16
CLIENT_QUEUE = 10_000  # messages queued for one client before it counts as not reading (ZeroMQ SNDHWM)
STOP_GRACE_S = 3.0  # an engine asked to stop (SIGTERM) gets this long before SIGKILL to its group
MAX_FAILURE_CHARS = 2000  # of the error an exiting engine reports
START_ERRORS = {cls.__name__: cls for cls in (ConfigError, CheckpointError, InputError)}  # raised again by start()


def check_bind(address: str, token: str | None) -> None:
    """Loopback (or ipc) by default; any other address needs a shared-secret token."""
    if not address.startswith(LOOPBACK) and not token:
        raise ProtocolError(f"binding {address} (not loopback) needs a shared-secret token (--token-file / "
                            f"PARADEC_TOKEN); every client must then send it", code="unauthorized")


def check_token(token: str | None) -> None:
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"the shared-secret token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                          f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")


@dataclass
class Flight:
    client: bytes  # the client's ZeroMQ identity
    client_id: str  # the id the client gave the request
    deadline: float | None  # time.monotonic() by which it ends (its arrival + timeout_s)
    started: float


def _engine_main(target, parent: int, requests_address: str, outputs_address: str, failure) -> None:
    """The engine process: dies with the frontend, leads its own process group (its ranks join
    it, so one killpg ends them all; a terminal's Ctrl-C reaches the frontend alone, which stops
    everything in order), then runs ``target``. What it raises goes to the frontend through
    ``failure`` (a pipe's sending end) as ``(type name, message)`` before the process exits."""
    die_with_parent(parent)
    os.setpgrp()
    try:
        target(requests_address, outputs_address)
    except Exception as e:
        # no lone surrogates (a path's undecodable bytes): the text goes on to clients in messages that must encode
        text = str(e)[:MAX_FAILURE_CHARS].encode("utf-8", "backslashreplace").decode()
        with contextlib.suppress(OSError):  # the frontend may be gone already
            failure.send((type(e).__name__, text))
        raise
    finally:
        failure.close()


class Frontend:
    def __init__(self, address: str, engine_target, token: str | None = None, max_pending: int = 64,
                 limits: Limits = Limits(), ready_timeout_s: float = 600.0, request_timeout_s: float | None = None,
                 stall_timeout_s: float | None = 60.0, restart: bool = True):
        """engine_target(requests_address, outputs_address): the engine process's entry point
        (called in a spawned process). request_timeout_s: the deadline of a request that sets no
        ``timeout_s`` (None: none). stall_timeout_s: with requests in flight, how long the engine
        may report no progress before it counts as stuck (None: never). restart: start a new
        engine after one died or stalled."""
        check_bind(address, token)
        check_token(token)
        if request_timeout_s is not None and not 0 < request_timeout_s < math.inf:  # inf, nan: no request would pass
            raise ConfigError(f"request_timeout_s must be a finite number > 0 or None, got {request_timeout_s}")
        self.address, self.token, self.max_pending, self.limits = address, token, max_pending, limits
        self.engine_target, self.ready_timeout_s = engine_target, ready_timeout_s
        self.request_timeout_s, self.stall_timeout_s, self.restart = request_timeout_s, stall_timeout_s, restart
        self.context = zmq.asyncio.Context()
        self.folder = tempfile.mkdtemp(prefix="paradec-")  # ipc sockets in a private folder (0700)
        self.engine_requests_address = f"ipc://{self.folder}/requests"
        self.engine_outputs_address = f"ipc://{self.folder}/outputs"
        self.flights: dict[str, Flight] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}  # (client, its id) -> internal id
        self.ids = itertools.count()
        self.state = "starting"  # starting | ready | restarting | dead | stopping
        self.engine_ready = asyncio.Event()
        self.engine: multiprocessing.Process | None = None
        self.failures = None  # the receiving end of the engine process's failure pipe
        self.engine_error: tuple[str, str] | None = None  # (type name, message) the engine raised, once read
        self.engine_started = 0.0
        self.last_progress = self.busy_since = time.monotonic()
        self.progress = 0
        self.restart_at: float | None = None
        self.dead_reason = ""
        self.unreachable: OrderedDict[bytes, None] = OrderedDict()  # clients logged as unreachable (bounded)
        self.background: set[asyncio.Task] = set()  # aborts sent from inside loops (held: tasks are weak)
        self.stats = {"accepted": 0, **{k: 0 for k in OUTCOMES}, **{k: 0 for k in REFUSALS}, "restarts": 0}

    @property
    def engine_alive(self) -> bool:
        return self.state == "ready"

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.clients = self._socket(zmq.ROUTER, self.address)
        self.clients.setsockopt(zmq.SNDHWM, CLIENT_QUEUE)
        self.to_engine = self._socket(zmq.ROUTER, self.engine_requests_address)
        self.to_engine.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted engine takes over the identity
        self.from_engine = self._socket(zmq.PULL, self.engine_outputs_address)
        self._spawn()
        self.tasks = [asyncio.create_task(self._outputs()), asyncio.create_task(self._watch())]
        try:
            await asyncio.wait_for(self.engine_ready.wait(), self.ready_timeout_s)
        except TimeoutError:
            raise RuntimeError(f"the engine did not start within {self.ready_timeout_s} s") from None
        if self.state != "ready":  # the engine's own error class where it raised one of paradec's
            raise START_ERRORS.get(self.engine_error[0] if self.engine_error else "", RuntimeError)(self.dead_reason)
        self.tasks.append(asyncio.create_task(self._clients()))
        log.info("serving on %s (engine pid %d)", self.address, self.engine.pid)

    def _socket(self, kind: int, address: str):
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unreachable peer raises instead of dropping
        if address == self.address:  # clients: a frame over the limit drops the sender's connection
            sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes + 1024)
        sock.bind(address)
        return sock

    def _spawn(self) -> None:
        """Starts an engine process (from this event-loop thread: its parent-death signal is tied
        to the thread that started it)."""
        ctx = multiprocessing.get_context("spawn")
        if self.failures is not None:
            self.failures.close()
        self.failures, failure = ctx.Pipe(duplex=False)
        self.engine_error = None
        self.engine = ctx.Process(target=_engine_main, daemon=True,
                                  args=(self.engine_target, os.getpid(), self.engine_requests_address,
                                        self.engine_outputs_address, failure))
        try:
            self.engine.start()
        finally:
            failure.close()  # the engine holds the sending end alone: its exit ends the pipe
        self.engine_started = time.monotonic()
        self.engine_ready.clear()

    async def refuse_all(self, reason: str = "the server is shutting down") -> None:
        """The first step of a stop: every request in flight ends with ``shutting_down``, and so
        does every new one; the frontend still routes (utility requests, late engine output)."""
        if self.state in ("stopping", "stopped"):
            return
        self.state = "stopping"
        for internal in list(self.flights):
            if (flight := self._close(internal)) is not None:  # None: closed meanwhile (its client is gone)
                await self._final(flight, MessageType.ERROR, {"code": "shutting_down", "message": reason},
                                  "shutting_down")

    async def stop(self, reason: str = "the server is shutting down") -> None:
        """Answers every request in flight with ``shutting_down``, ends the engine (SIGTERM, then
        SIGKILL to its process group after STOP_GRACE_S) and closes the sockets (the replies
        still queued for clients get up to a second to leave)."""
        if self.state == "stopped":
            return
        await self.refuse_all(reason)
        me = asyncio.current_task()
        for task in getattr(self, "tasks", []):
            if task is not me:
                task.cancel()
        await self._end_engine(STOP_GRACE_S)
        self.state = "stopped"
        if hasattr(self, "clients"):
            self.clients.close(linger=1000)
        self.context.destroy(linger=0)
        if self.failures is not None:
            self.failures.close()
            self.failures = None
        shutil.rmtree(self.folder, ignore_errors=True)

    async def _end_engine(self, grace_s: float) -> None:
        """SIGTERM (a multi-rank engine ends its ranks), then SIGKILL to the engine's process
        group: the engine and every rank it started."""
        engine = self.engine
        if engine is None:
            return
        if engine.is_alive() and grace_s > 0:
            engine.terminate()
            deadline = time.monotonic() + grace_s
            while engine.is_alive() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        kill_group(engine.pid)
        if engine.is_alive():
            engine.kill()
        deadline = time.monotonic() + 5
        while engine.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        engine.join(0)

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.gather(*self.tasks)
        finally:
            await self.stop()

    # --- clients -> engine -------------------------------------------------------------------
    async def _clients(self) -> None:
        while True:
            await asyncio.sleep(0)  # a ready message does not yield: take turns with the engine's output
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
            reply = self.health() if message.body["method"] == "health" else self.counters()
            return await self._reply(identity, MessageType.OUTPUT, {"id": client_id, "kind": "utility", "reply": reply})
        key = (identity, client_id)
        if message.type == MessageType.ABORT:
            internal = self.by_client.get(key)
            if internal is not None and self.state == "ready":  # unknown or finished ids: nothing to stop
                await self._to_engine(MessageType.ABORT, {"id": internal})
            return
        if self.state == "stopping":
            self.stats["unavailable"] += 1
            return await self._reply(identity, MessageType.ERROR, {"id": client_id, "code": "shutting_down",
                                                                  "message": "the server is shutting down"})
        if self.state != "ready":
            self.stats["unavailable"] += 1
            restarting = self.state in ("starting", "restarting")  # a retry shortly may succeed
            return await self._reply(identity, MessageType.ENGINE_DEAD,
                                     {"id": client_id, "message": self._dead_reason(), "restarting": restarting})
        if key in self.by_client:  # id null: an ERROR with this id would read as the live request's final
            self.stats["invalid"] += 1
            return await self._reply(identity, MessageType.ERROR, {"id": None, "code": "invalid",
                                                                  "message": f"request {client_id!r} is already in flight"})
        if len(self.flights) >= self.max_pending:
            self.stats["busy"] += 1
            return await self._reply(identity, MessageType.ERROR, {"id": client_id, "code": "busy", "message":
                                     f"{len(self.flights)} requests in flight, the limit is {self.max_pending}; retry later"})
        now = time.monotonic()
        timeout = message.body.get("timeout_s") or self.request_timeout_s
        internal = f"r{next(self.ids)}"
        if not self.flights:
            self.busy_since = now  # the stall clock starts when work arrives at an idle engine
        self.flights[internal] = Flight(identity, client_id, None if timeout is None else now + timeout, now)
        self.by_client[key] = internal
        self.stats["accepted"] += 1
        body = {**message.body, "id": internal}
        if timeout is not None:
            body["timeout_s"] = float(timeout)
        if not await self._to_engine(MessageType.ADD, body, message.buffers):
            flight = self.flights.get(internal)
            if flight is not None:
                self._close(internal)
                await self._final(flight, MessageType.ERROR, {"code": "failed", "message":
                                                              "the engine could not be reached"}, "errors")

    async def _to_engine(self, kind: MessageType, body: dict, buffers=None, patience_s: float = 2.0) -> bool:
        """Sends to the engine without blocking; False when it cannot take the message (its queue
        is full: it is stuck, which the stall watch reports) or cannot be reached within
        ``patience_s`` (its DEALER may still be connecting right after start)."""
        try:
            frames = [ENGINE_IDENTITY, *encode(kind, body, buffers, self.limits)]
        except ProtocolError as e:  # a client's frame that grew past the limit with the frontend's fields
            log.warning("a message for the engine was not sent: %s", e)
            return False
        deadline = time.monotonic() + patience_s
        while True:
            try:
                await self.to_engine.send_multipart(frames, flags=zmq.NOBLOCK)
                return True
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH or time.monotonic() > deadline or self.state != "ready":
                    log.warning("could not reach the engine: %s", e)
                    return False
                await asyncio.sleep(0.01)

    async def _reply(self, identity: bytes, kind: MessageType, body: dict, buffers=None) -> bool:
        """Sends to one client without blocking; False when it cannot take the message (it
        disconnected, or its queue is full: it does not read). Never raises."""
        try:
            frames = encode(kind, body, buffers, self.limits)
        except ProtocolError as e:  # a result too large for one frame: the request still gets an ERROR
            if kind != MessageType.OUTPUT or body.get("kind") != "final":
                log.error("a message to a client was not sent: %s", e)
                return False
            kind, buffers = MessageType.ERROR, None
            frames = encode(kind, {"id": body["id"], "code": "too_large", "message": str(e)}, None, self.limits)
        try:
            await self.clients.send_multipart([identity, *frames], flags=zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: gone; EAGAIN: its queue is full
            self._unreachable(identity, e)
            return False
        except Exception:  # noqa: BLE001 - no client may stop the frontend
            log.exception("a message to a client was not sent")
            return False

    def _unreachable(self, identity: bytes, error: zmq.ZMQError) -> None:
        """A client that cannot take messages loses its requests (aborted at the engine), and is
        logged once (the log remembers the last 10 000 such clients)."""
        lost = [internal for (client, _), internal in self.by_client.items() if client == identity]
        if identity not in self.unreachable:
            why = "does not read its replies" if error.errno == zmq.EAGAIN else "is gone"
            log.log(logging.WARNING if lost else logging.DEBUG, "client %s %s: %d requests aborted, its replies "
                    "dropped", identity.hex(), why, len(lost))
            self.unreachable[identity] = None
            if len(self.unreachable) > 10_000:
                self.unreachable.popitem(last=False)
        for internal in lost:
            if internal in self.flights:
                self._close(internal)
                self.stats["disconnected"] += 1
                if self.state == "ready":  # from a loop over the table: sent soon, not awaited here
                    task = asyncio.get_running_loop().create_task(
                        self._to_engine(MessageType.ABORT, {"id": internal}, patience_s=0))
                    self.background.add(task)
                    task.add_done_callback(self.background.discard)

    async def _final(self, flight: Flight, kind: MessageType, body: dict, outcome: str, buffers=None) -> None:
        """A closed request's final message to its client, counted as ``outcome`` when delivered
        and as ``undelivered`` when not."""
        delivered = await self._reply(flight.client, kind, {**body, "id": flight.client_id}, buffers)
        self.stats[outcome if delivered else "undelivered"] += 1

    # --- engine -> clients -------------------------------------------------------------------
    async def _outputs(self) -> None:
        while True:
            await asyncio.sleep(0)  # take turns with the clients' messages
            frames = await self.from_engine.recv_multipart()
            try:
                await self._from_engine(frames)
            except Exception:  # noqa: BLE001 - no engine message may stop the frontend
                log.exception("an engine message could not be handled")

    async def _from_engine(self, frames: list[bytes]) -> None:
        try:
            message = decode(frames, self.limits)
        except ProtocolError as e:
            log.error("the engine sent a malformed message: %s", e)
            return
        now = time.monotonic()
        if message.type == MessageType.OUTPUT and message.body["kind"] in ("ready", "alive"):
            pid = (message.body.get("reply") or {}).get("pid")
            if self.engine is None or pid != self.engine.pid:
                return  # a message a killed engine left behind
            if message.body["kind"] == "ready" and self.state in ("starting", "restarting"):
                self.state, self.last_progress, self.progress = "ready", now, 0
                log.info("the engine (pid %d) is ready", pid)
                self.engine_ready.set()
            elif message.body["kind"] == "alive" and message.body.get("step", 0) != self.progress:
                self.progress, self.last_progress = message.body["step"], now
            return
        flight = self.flights.get(message.id)
        if flight is None:
            return  # a request the frontend already closed (timed out, client gone, engine replaced)
        self.last_progress = now
        if message.type != MessageType.OUTPUT or message.body["kind"] == "final":
            self._close(message.id)
            code = message.body.get("code")
            outcome = "finished" if code is None else "refused" if message.body.get("refused") \
                else code if code in ("aborted", "timeout") else "errors"
            return await self._final(flight, message.type, message.body, outcome, message.buffers)
        # progress: when it cannot be delivered, _unreachable closes the request and aborts it at the engine
        await self._reply(flight.client, message.type, {**message.body, "id": flight.client_id}, message.buffers)

    def _close(self, internal: str) -> Flight | None:
        """Removes a request from the table: its Flight, or None when it was closed already (a
        reply that failed in a loop over the table closes that client's other requests)."""
        flight = self.flights.pop(internal, None)
        if flight is not None:
            self.by_client.pop((flight.client, flight.client_id), None)
        return flight

    # --- deadlines, liveness, restarts --------------------------------------------------------
    async def _watch(self) -> None:
        checked = time.monotonic()
        while True:
            await asyncio.sleep(0.05)
            now = time.monotonic()
            if now - checked > 0.5:  # the frontend itself fell behind (a busy host): not the engine's time
                self.last_progress += now - checked - 0.05
            checked = now
            try:
                await self._check()
            except Exception:  # noqa: BLE001 - the watch must go on
                log.exception("the watch failed a round")

    async def _check(self) -> None:
        now = time.monotonic()
        for internal, flight in list(self.flights.items()):
            if flight.deadline is not None and now > flight.deadline and self._close(internal) is not None:
                await self._final(flight, MessageType.ERROR, {"code": "timeout", "message":
                                  f"no result within {flight.deadline - flight.started:g} s of its arrival "
                                  f"(waiting included)"}, "timeout")
                if self.state == "ready":
                    await self._to_engine(MessageType.ABORT, {"id": internal}, patience_s=0)
        if self.state == "ready":
            if not self.engine.is_alive():
                await self._lost(self._exit_reason("the engine process exited"), stalled=False)
            elif (self.stall_timeout_s is not None and self.flights
                  and now - max(self.last_progress, self.busy_since) > self.stall_timeout_s):
                await self._lost(f"the engine made no progress for {self.stall_timeout_s:g} s with "
                                 f"{len(self.flights)} requests in flight (the stall timeout must exceed the "
                                 f"longest step; with several ranks, the longest batch)", stalled=True)
        elif self.state in ("starting", "restarting") and self.engine is not None:
            if not self.engine.is_alive():
                self._give_up(self._exit_reason("the engine exited while starting"))
            elif now - self.engine_started > self.ready_timeout_s:
                await self._end_engine(0)
                self._give_up(f"the engine did not start within {self.ready_timeout_s:g} s")
        elif self.state == "restarting" and self.engine is None and now >= self.restart_at:
            self.stats["restarts"] += 1
            log.warning("starting a new engine (restart %d)", self.stats["restarts"])
            self._spawn()

    def _exit_reason(self, what: str) -> str:
        """``what`` with the exited engine's exit code and, where it sent one, the error it raised."""
        try:
            if self.engine_error is None and self.failures is not None and self.failures.poll():
                error = self.failures.recv()
                if isinstance(error, tuple) and len(error) == 2 and all(isinstance(x, str) for x in error):
                    self.engine_error = error
        except (EOFError, OSError):  # it exited without sending one (killed, or os._exit)
            pass
        reason = f"{what} (code {self.engine.exitcode})"
        return reason if self.engine_error is None else f"{reason}: {self.engine_error[0]}: {self.engine_error[1]}"

    def _give_up(self, reason: str) -> None:
        self.state, self.dead_reason = "dead", reason
        log.error("%s; not restarting", reason)
        self.engine_ready.set()  # wake a start() still waiting

    async def _lost(self, reason: str, stalled: bool) -> None:
        """The engine died or is stuck: every request in flight gets its final message (``stalled``
        or ENGINE_DEAD), the engine and its ranks are killed, and a new one starts (with restart)."""
        self.dead_reason = reason
        self.state = "restarting" if self.restart else "dead"
        log.error("%s", reason)
        for internal in list(self.flights):
            if (flight := self._close(internal)) is None:
                continue
            if stalled:
                await self._final(flight, MessageType.ERROR, {"code": "stalled", "message": reason}, "stalled")
            else:
                await self._final(flight, MessageType.ENGINE_DEAD, {"message": reason, "restarting": self.restart},
                                  "engine_dead")
        await self._end_engine(0)  # a stuck engine gets no grace; a dead one may have left ranks behind
        if self.restart:
            self.engine = None
            self.restart_at = max(time.monotonic(), self.engine_started + 1.0)  # at most one restart a second

    def _dead_reason(self) -> str:
        if self.state in ("starting", "restarting"):
            return f"the engine is (re)starting ({self.dead_reason or 'first start'}); retry shortly"
        return f"{self.dead_reason or 'the engine is gone'}; the frontend is up but cannot decode"

    def health(self) -> dict:
        return {"healthy": self.state == "ready", "state": self.state,
                "engine_pid": self.engine.pid if self.engine is not None else None,
                "in_flight": len(self.flights), "max_pending": self.max_pending, "restarts": self.stats["restarts"]}

    def counters(self) -> dict:
        return {**self.stats, "in_flight": len(self.flights)}


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
        try:
            self.frontend = Frontend(*self.frontend_args, **self.frontend_kwargs)
            self.loop.run_until_complete(self.frontend.start())
        except BaseException as e:  # noqa: BLE001 - raised again in the constructing thread
            self.error = e
        self.started.set()
        self.loop.run_forever()

    @property
    def address(self) -> str:
        return self.frontend.address

    def call(self, fn, timeout_s: float = 30.0):
        """``fn()`` run on the frontend's event loop (tests read its state this way)."""
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)

    def stop(self) -> None:
        if hasattr(self, "frontend"):
            asyncio.run_coroutine_threadsafe(self.frontend.stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


class EngineTarget:
    """A picklable engine entry point for the spawned engine process. model: a checkpoint
    directory or built-in name, or a picklable callable ``model(device) -> DiffusionModel``
    (random weights for benchmarks; one process only). max_batch: requests decoded at once.
    kv_memory_fraction: of the free GPU memory, the share the batching engine's KV rows may take
    (one process; ranks batch by config and keep no pool). warm_up: request settings (dicts)
    whose shapes the engine captures CUDA graphs for before it reports ready, besides the model's
    defaults (one process)."""

    def __init__(self, model, max_batch: int = 8, device: str | None = None, limits: Limits = Limits(),
                 nproc: int = 1, kv_memory_fraction: float = 0.8, warm_up: tuple[dict, ...] = ()):
        if not 0 < kv_memory_fraction <= 1:
            raise ConfigError(f"kv_memory_fraction must lie in (0, 1], got {kv_memory_fraction!r}")
        self.model, self.max_batch, self.device, self.limits, self.nproc = model, max_batch, device, limits, nproc
        self.kv_memory_fraction, self.warm_up = kv_memory_fraction, tuple(warm_up)

    def __call__(self, requests_address: str, outputs_address: str) -> None:
        if self.nproc == 1:
            run_engine(self.model, requests_address, outputs_address, self.max_batch, self.device, self.limits,
                       self.kv_memory_fraction, self.warm_up)
        else:
            from paradec.serve.ranks import run_ranks

            run_ranks(self.nproc, self.model, requests_address, outputs_address, self.max_batch, self.device,
                      self.limits)
