"""The engine: one process that owns the model, takes requests from the frontend over a DEALER
socket and sends progress and results back over a PUSH socket.

Scheduling is continuous batching (``paradec.batching.BatchEngine``): a request is checked when
it arrives (the wire's limits, then every setting, the prompt and the canvas; a refusal is its
ERROR at once) and queued in the batching engine, which admits it into a free row of the running
batch at the next engine step and retires it when it is done, its row going to the next waiting
request. Requests of any settings share the batch — greedy or sampled, any policy, any canvas —
and each gets the tokens and trace that ``paradec.generate`` gives it alone (DESIGN.md
contract 7: its keys in a row of its own, its seeds and counters its own; steps and NFE as
``generate()`` counts them stepping one at a time). At most ``max_batch``
requests decode at once (fewer where ``kv_memory_fraction`` of the free GPU memory holds fewer
rows); a row holds a prompt of up to ``Limits.max_prompt_tokens`` and a canvas of up to
``Limits.max_canvas_tokens`` tokens (each capped by the model's maximum length). The batching
engine's own bounds (its ``max_blocks`` think blocks, ``BatchEngine``'s defaults) refuse a request
with ``invalid``, naming the bound.

Between engine steps (``BatchEngine.step``: one action of every live request, or a few decode
steps in a row where the batching engine finds that nothing can end sooner) the loop reads new
messages (ADDs join the batch at the next step, an ABORT frees the request's row at once), fails
the requests whose deadline passed (``timeout``, waiting or decoding), streams progress
({"step", "committed", "lengths"}, the request's own step count) to the requests that asked for
it, and sends each finished request its result, whose ``engine_s`` holds ``queued`` (arrival
here to admission) and ``generate`` (admission to its last step). A step that raises fails the
requests it was decoding (``failed``) and the loop goes on with the others. Every request
accepted gets exactly one final OUTPUT or one ERROR; a result too large for one frame becomes an
ERROR ``too_large``. The CUDA graphs of the model's default settings, and of the operator's
``warm_up`` settings, are captured before the engine reports ``ready``.

An engine of several ranks (``paradec.serve.ranks``) cannot batch this way (a batching engine
decodes in one process on one device): its rank 0 keeps a batch-by-config scheduler of its own
over the same message handling (``MessageLoop``).

Liveness is progress: the engine counts what it gets done (engine steps, messages handled) and
reports the count to the frontend (an ``alive`` OUTPUT, at most every ``ALIVE_EVERY_S``) from its
own decode loop, never from a side thread; a frontend that sees work pending and the count
standing still knows the engine is stuck. The engine exits when its parent (the frontend) is
gone (``PR_SET_PDEATHSIG`` set by the frontend, and ``getppid`` checked here).
"""

from __future__ import annotations

import abc
import json
import logging
import os
import time
from dataclasses import dataclass, field

import torch
import zmq

import paradec
from paradec.api import build_layout, encode_prompt, resolve_config
from paradec.batching import BatchEngine
from paradec.batching.sequence import Sequence
from paradec.config import GenerationConfig
from paradec.errors import ConfigError, InputError, ParadecError
from paradec.serve.protocol import CONTEXT_EXCEEDED, Limits, Message, MessageType, ProtocolError, decode, encode

log = logging.getLogger(__name__)
ENGINE_IDENTITY = b"engine"
ALIVE_EVERY_S = 0.2  # the most often the engine reports its progress count


@dataclass
class Request:
    id: str
    prompt: list[int]  # token ids (encoded and checked on arrival)
    config: GenerationConfig
    stream: bool
    deadline: float | None  # time.monotonic() after which the request fails with "timeout"
    arrived: float = field(default_factory=time.monotonic)


class MessageLoop(abc.ABC):
    """What every engine process does with messages: requests from the frontend in (checked
    against the limits), progress and results out, liveness from its own loop. Scheduling is a
    subclass's: ``_start`` (before "ready"), ``_queue`` (an accepted request; raising refuses it
    as ``invalid``), ``_abort``, ``_expire`` (deadlines), ``_busy`` and ``_work`` (one unit of
    decoding: an engine step, or a whole batch under several ranks)."""

    def __init__(self, model, requests_address: str, outputs_address: str, max_batch: int = 8,
                 limits: Limits = Limits(), context: zmq.Context | None = None):
        self.model, self.max_batch, self.limits = model, max_batch, limits
        self.context = context or zmq.Context.instance()
        self.requests = self.context.socket(zmq.DEALER)
        self.requests.setsockopt(zmq.IDENTITY, ENGINE_IDENTITY)
        self.requests.setsockopt(zmq.LINGER, 0)
        self.requests.connect(requests_address)
        self.outputs = self.context.socket(zmq.PUSH)
        self.outputs.setsockopt(zmq.LINGER, 2000)
        self.outputs.connect(outputs_address)
        self.progress = 0  # engine steps (or batches) + messages handled: what liveness watches
        self.reported, self.reported_at = -1, 0.0
        self.parent = os.getppid()

    # --- scheduling (a subclass's) -----------------------------------------------------------
    def _start(self) -> None:
        """Before the engine reports "ready"."""

    @abc.abstractmethod
    def _queue(self, request: Request) -> None:
        """An accepted request; raising refuses it as ``invalid``."""

    @abc.abstractmethod
    def _abort(self, request_id: str) -> None:
        """ABORT: the request gets its ERROR and is decoded no further."""

    @abc.abstractmethod
    def _expire(self) -> None:
        """Requests past their deadline get ERROR ``timeout``."""

    @abc.abstractmethod
    def _busy(self) -> bool:
        """Whether there is decoding to do."""

    @abc.abstractmethod
    def _work(self) -> None:
        """One unit of decoding: an engine step, or a whole batch under several ranks."""

    def serve_forever(self) -> None:
        self._start()
        self._send(MessageType.OUTPUT, {"id": "engine", "kind": "ready", "reply": {"pid": os.getpid()}})
        while True:
            self._drain(0 if self._busy() else 50)
            self._expire()
            self._alive()
            if self._busy():
                self._work()
                self.progress += 1
                self._alive()

    # --- sending -----------------------------------------------------------------------------
    def _send(self, kind: MessageType, body: dict, buffers=None) -> None:
        try:
            frames = encode(kind, body, buffers, self.limits)
        except ProtocolError as e:  # too large for one frame: the request still gets its one final message
            if kind == MessageType.OUTPUT and body.get("kind") == "final":
                return self._error(body["id"], "too_large", f"the result does not fit in one message: {e}")
            log.error("a message was not sent: %s", e)
            return
        self.outputs.send_multipart(frames)

    def _alive(self) -> None:
        """Reports the progress count when it moved (at most every ALIVE_EVERY_S); exits when the
        frontend that started this engine is gone."""
        now = time.monotonic()
        if self.progress != self.reported and now - self.reported_at >= ALIVE_EVERY_S:
            self.reported, self.reported_at = self.progress, now
            self._send(MessageType.OUTPUT, {"id": "engine", "kind": "alive", "step": self.progress,
                                            "reply": {"pid": os.getpid()}})
        if os.getppid() != self.parent:
            log.error("the frontend (pid %d) is gone; the engine exits", self.parent)
            os._exit(1)

    def _error(self, request_id: str | None, code: str, message: str, refused: bool = False) -> None:
        """The request's one ERROR (its final message); ``refused``: its ADD was refused (a bad
        setting or prompt, one that can never fit), before the engine queued it."""
        self._send(MessageType.ERROR, {"id": request_id, "code": code, "message": message}
                   | ({"refused": True} if refused else {}))

    def _final(self, request_id: str, result, engine_s: dict) -> None:
        """The request's result (its final message)."""
        body = _result_body(result) | {"engine_s": engine_s}
        self._send(MessageType.OUTPUT, {"id": request_id, "kind": "final", "result": body},
                   [result.token_ids, result.trace])

    # --- receiving ---------------------------------------------------------------------------
    def _drain(self, timeout_ms: int) -> None:
        """Handles every message that arrives within ``timeout_ms`` (0: only those waiting)."""
        while self.requests.poll(timeout_ms):
            timeout_ms = 0
            frames = self.requests.recv_multipart()
            self.progress += 1
            try:
                self._handle(decode(frames, self.limits))
            except ProtocolError as e:  # the frontend validated it already; a bug if it gets here
                self._error(None, e.code, str(e))
            except Exception:  # noqa: BLE001 - one message must never take the loop down
                log.exception("a message could not be handled")

    def _handle(self, message: Message) -> None:
        if message.type == MessageType.ADD:
            self._add(message)
        elif message.type == MessageType.ABORT:
            self._abort(message.id)

    def _add(self, message: Message) -> None:
        body = message.body
        try:
            config = resolve_config(self.model, **(body.get("config") or {}))
            body_tokens = config.body_tokens
            if body_tokens > self.limits.max_canvas_tokens or (config.canvas and config.blocks > 256):
                raise ProtocolError(f"the canvas holds {body_tokens} tokens in {config.blocks if config.canvas else 1} "
                                    f"region(s); the limits are {self.limits.max_canvas_tokens} tokens and 256 blocks",
                                    code="too_large")
            layout = build_layout(self.model, config)
            if layout.length > self.limits.max_canvas_tokens:
                raise ProtocolError(f"the canvas is {layout.length} tokens, over the limit of "
                                    f"{self.limits.max_canvas_tokens}", code="too_large")
            prompt = self._prompt(message)
            ids = encode_prompt(self.model, prompt, config, layout)  # refuses bad prompts now, not mid-batch
            if len(ids) > self.limits.max_prompt_tokens:
                raise ProtocolError(f"the prompt is {len(ids)} tokens, over the limit of "
                                    f"{self.limits.max_prompt_tokens}", code="too_large")
            if len(ids) + layout.length > self.model.spec.max_length:
                raise ProtocolError(f"prompt ({len(ids)} tokens) + canvas ({layout.length}) {CONTEXT_EXCEEDED} "
                                    f"{self.model.spec.max_length}", code="too_large")
            timeout = body.get("timeout_s")
            self._queue(Request(body["id"], ids, config, bool(body.get("stream")),
                                time.monotonic() + timeout if timeout else None))
            if body.get("accepted"):  # past every refusal: what is left can only end it later (timeout, abort)
                self._send(MessageType.OUTPUT, {"id": body["id"], "kind": "accepted"})
        except ProtocolError as e:
            return self._error(body["id"], e.code, str(e), refused=True)
        except ParadecError as e:
            return self._error(body["id"], "invalid", str(e), refused=True)
        except Exception as e:  # noqa: BLE001 - a setting of the wrong type (threshold="x"), a chat template's error
            return self._error(body["id"], "invalid", f"{type(e).__name__}: {e}", refused=True)

    def _prompt(self, message: Message) -> str | list:
        """Text, token ids, or chat messages (``encode_prompt`` renders them, their text plain)."""
        body = message.body
        if body.get("prompt") is not None:
            return body["prompt"]
        if "messages" in body:
            return body["messages"]
        return message.buffers[0].tolist()


@dataclass
class _Live:
    """A request inside the batching engine: its ``sequence`` there and the last step its
    progress reported."""

    request: Request
    sequence: Sequence
    reported: int = 0

    @property
    def started(self) -> bool:
        return self.sequence.started is not None


class EngineLoop(MessageLoop):
    """The engine process's loop: requests from the frontend in, decoded by continuous batching
    (``paradec.batching.BatchEngine``, one engine step at a time), progress and results out;
    liveness is its progress. The batching engine is built (and warmed up) at ``serve_forever``."""

    def __init__(self, model, requests_address: str, outputs_address: str, max_batch: int = 8,
                 limits: Limits = Limits(), context: zmq.Context | None = None, kv_memory_fraction: float = 0.8,
                 warm_up: tuple[dict, ...] = ()):
        super().__init__(model, requests_address, outputs_address, max_batch, limits, context)
        self.kv_memory_fraction, self.warm_up = kv_memory_fraction, warm_up
        self.engine: BatchEngine | None = None  # built by _start
        self.live: dict[str, _Live] = {}  # every request in the batching engine, waiting or decoding

    def _start(self) -> None:
        """Builds the batching engine and captures the CUDA graphs of the model's defaults and of
        the ``warm_up`` settings."""
        defaults = resolve_config(self.model)
        max_length = self.model.spec.max_length
        self.engine = BatchEngine(self.model, max_batch=self.max_batch,
                                  max_prompt_tokens=min(self.limits.max_prompt_tokens, max_length),
                                  max_canvas_tokens=min(self.limits.max_canvas_tokens, max_length),
                                  kv_memory_fraction=self.kv_memory_fraction, cuda_graphs=defaults.cuda_graphs,
                                  batch_invariant=defaults.batch_invariant)
        started = time.monotonic()
        configs = []
        for settings in self.warm_up:  # a setting these rows cannot decode fails the start, named
            try:
                configs.append(resolve_config(self.model, **settings))
                self.engine.layout_for(configs[-1])
            except (ConfigError, InputError) as e:
                raise type(e)(f"warm-up settings {json.dumps(settings, default=repr)}: {e}") from None
        try:  # the defaults where the rows hold them (else only requests that ask for less are served)
            self.engine.layout_for(defaults)
            configs.insert(0, defaults)
        except (ConfigError, InputError) as e:
            log.warning("the model's default settings are not served by these rows: %s", e)
        graphs = self.engine.warm_up(configs)
        log.info("continuous batching: %d rows, %d CUDA graphs captured in %.1f s", self.engine.max_batch, graphs,
                 time.monotonic() - started)

    def _queue(self, request: Request) -> None:
        sequence = self.engine.add(request.id, request.prompt, request.config, stream=request.stream)
        self.live[request.id] = _Live(request, sequence)

    def _abort(self, request_id: str) -> None:
        live = self.live.pop(request_id, None)
        if live is None:  # unknown, or finished already
            return
        self.engine.abort(request_id)
        self._error(request_id, "aborted", "aborted while decoding" if live.started else "aborted before it started")

    def _expire(self) -> None:
        now = time.monotonic()
        for live in [x for x in self.live.values() if x.request.deadline is not None and now > x.request.deadline]:
            del self.live[live.request.id]
            self.engine.abort(live.request.id)
            self._error(live.request.id, "timeout", f"timed out after {live.sequence.steps} steps" if live.started
                        else "timed out waiting for the engine")

    def _busy(self) -> bool:
        return bool(self.live)

    def _work(self) -> None:
        """One engine step: new requests join the batch, every live one takes one action."""
        try:
            outputs = self.engine.step()
        except Exception as e:  # noqa: BLE001 - one failed step must not take the engine down
            log.exception("an engine step failed")
            return self._failed(f"{type(e).__name__}: {e}")
        for out in outputs:
            live = self.live.get(out.request_id)
            if live is None:  # aborted or timed out already (it got its ERROR)
                continue
            if out.finished:
                del self.live[out.request_id]
                timings = out.result.timings
                self._final(out.request_id, out.result, {"queued": timings.get("queued", 0.0),
                                                         "generate": timings.get("total", 0.0)})
            elif live.request.stream and out.step > live.reported:
                live.reported = out.step
                self._send(MessageType.OUTPUT, {"id": out.request_id, "kind": "progress", "step": out.step,
                                                "committed": out.committed, "lengths": out.lengths})

    def _failed(self, reason: str) -> None:
        """After a step raised: every request it was decoding gets ERROR ``failed`` and leaves the
        batching engine (rebuilt if even that fails); those still waiting stay queued."""
        try:
            for sequence in list(self.engine.live):
                self.engine.abort(sequence.request_id)
            waiting = {sequence.request_id for sequence in self.engine.waiting}
        except Exception:  # noqa: BLE001 - a broken engine: start a new one, nothing survives it
            log.exception("the batching engine could not drop the failed requests; building a new one")
            self.engine = None  # its pool freed before the new one takes the memory
            if self.model.device.type == "cuda":
                torch.cuda.empty_cache()  # else free memory, which sizes the new pool, counts the old one's
            self._start()  # if this raises too, the engine process ends (the frontend restarts it)
            waiting = set()
        for request_id in [i for i in self.live if i not in waiting]:
            del self.live[request_id]
            self._error(request_id, "failed", reason)


def _result_body(result) -> dict:
    return {"blocks": result.blocks, "summary": result.summary, "answer": result.answer, "nfe": result.nfe,
            "steps": result.steps, "timings": result.timings, "prompt_tokens": len(result.prompt_ids),
            "block_tokens": [len(b) for b in result.block_token_ids], "summary_tokens": len(result.summary_token_ids),
            "text": result.text, "finish_reason": result.finish_reason,
            "text_tokens": len(result.answerer.token_ids if result.answerer is not None else result.summary_token_ids)}


def run_engine(model_path, requests_address: str, outputs_address: str, max_batch: int = 8,
               device: str | None = None, limits: Limits = Limits(), kv_memory_fraction: float = 0.8,
               warm_up: tuple[dict, ...] = ()) -> None:
    """The engine process's entry point. model_path: a checkpoint or built-in name, or a callable
    ``model_path(device) -> DiffusionModel``; warm_up: settings whose graphs to capture first."""
    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_path(device) if callable(model_path) else paradec.load(model_path, device=device)
    EngineLoop(model, requests_address, outputs_address, max_batch, limits,
               kv_memory_fraction=kv_memory_fraction, warm_up=warm_up).serve_forever()
