"""The engine: one process that owns the model, takes requests from the frontend over a DEALER
socket and sends progress and results back over a PUSH socket.

Scheduling: requests wait in arrival order; the engine decodes the oldest together with every
waiting request it is *compatible* with, up to ``max_batch``: the same runtime settings (one
runner steps the batch) and, for now, the same per-request parameters (``config.request``; a
batch decodes one config — mixed parameters are continuous batching's), greedy (``temperature``
0, an order other than ``random``) and ``isolated`` attention, where batching cannot change a
request's tokens (DESIGN.md contract 3; sampled requests decode alone because request r of a
batch draws from ``seed + r``). The distributed settings are the operator's, the same for every
request. A batched request gets the tokens it would
get alone; its trace and NFE count the batch's steps (a summary starts once every think block of
the batch is done), as ``paradec.generate`` on the same batch reports them. Between steps it reads new messages
(ABORT, more ADDs), streams progress to the requests that asked for it, and stops the batch
once every request in it was aborted. Every request it accepted gets exactly one final OUTPUT
or one ERROR; a result too large for one frame becomes an ERROR ``too_large``.

Liveness is progress: the engine counts what it gets done (steps decoded, messages handled,
batches ended) and reports the count to the frontend (an ``alive`` OUTPUT, at most every
``ALIVE_EVERY_S``) from its own decode loop, never from a side thread; a frontend that sees work
pending and the count standing still knows the engine is stuck. The engine exits when its parent
(the frontend) is gone (``PR_SET_PDEATHSIG`` set by the frontend, and ``getppid`` checked here).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

import paradec
from paradec.api import build_layout, encode_prompt, resolve_config
from paradec.config import GenerationConfig, RequestParams
from paradec.decoding.progress import Progress
from paradec.distributed.guard import RankFailure
from paradec.errors import ParadecError
from paradec.serve.protocol import Limits, Message, MessageType, ProtocolError, decode, encode

log = logging.getLogger(__name__)
ENGINE_IDENTITY = b"engine"
ALIVE_EVERY_S = 0.2  # the most often the engine reports its progress count


class _AllAborted(Exception):
    """Every request of the running batch was aborted: stop decoding it."""


@dataclass
class Request:
    id: str
    prompt: str | list[int]
    config: GenerationConfig
    stream: bool
    deadline: float | None  # time.monotonic() after which the request fails with "timeout"
    arrived: float = field(default_factory=time.monotonic)

    def batches_with(self, other: Request) -> bool:
        """Whether ``other`` may join this request's batch: the same request parameters (for
        now) and runtime settings, and parameters whose tokens batching cannot change."""
        return (other.config.request == self.config.request and other.config.runtime == self.config.runtime
                and batchable(self.config.request))


def batchable(params: RequestParams) -> bool:
    """Whether a request with these parameters gets the same tokens in a batch as alone: greedy
    (sampled requests draw from ``seed + r``, r the batch position; so do ``random`` order's and
    ``rank_temperature``'s position draws) under ``isolated`` attention."""
    return (params.temperature == 0 and params.mode != "random" and params.attention == "isolated"
            and params.rank_temperature == 0)


class EngineLoop:
    """The engine process's loop: requests from the frontend in, batches of compatible ones
    decoded through ``paradec.generate`` (the model's ``paradec.Engine`` keeps its runners),
    progress and results out; liveness is its progress."""

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
        self.waiting: deque[Request] = deque()
        self.aborted: set[str] = set()  # ids of the running batch to stop reporting (and to end with an ERROR)
        self.errored: set[str] = set()  # ids of the running batch that already got their ERROR
        self.running: dict[str, Request] = {}
        self.progress = 0  # steps decoded + messages handled + batches ended: what liveness watches
        self.reported, self.reported_at = -1, 0.0
        self.parent = os.getppid()

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

    def _error(self, request_id: str | None, code: str, message: str) -> None:
        """The request's one ERROR (its final message)."""
        if request_id is not None:
            self.errored.add(request_id)
        self._send(MessageType.ERROR, {"id": request_id, "code": code, "message": message})

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
            except Exception:  # noqa: BLE001 - never into a running batch's on_step, never out of the loop
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
            body_tokens = config.blocks * config.block_len + config.summary_len if config.canvas else config.answer_len
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
                raise ProtocolError(f"prompt ({len(ids)} tokens) + canvas ({layout.length}) exceed the model's "
                                    f"maximum length {self.model.spec.max_length}", code="too_large")
        except ProtocolError as e:
            return self._error(body["id"], e.code, str(e))
        except ParadecError as e:
            return self._error(body["id"], "invalid", str(e))
        except Exception as e:  # noqa: BLE001 - a setting of the wrong type (threshold="x"), a chat template's error
            return self._error(body["id"], "invalid", f"{type(e).__name__}: {e}")
        timeout = body.get("timeout_s")
        self.waiting.append(Request(body["id"], ids, config, bool(body.get("stream")),
                                    time.monotonic() + timeout if timeout else None))

    def _prompt(self, message: Message) -> str | list:
        """Text, token ids, or chat messages (``encode_prompt`` renders them, their text plain)."""
        body = message.body
        if body.get("prompt") is not None:
            return body["prompt"]
        if "messages" in body:
            return body["messages"]
        return message.buffers[0].tolist()

    def _abort(self, request_id: str) -> None:
        for request in list(self.waiting):
            if request.id == request_id:
                self.waiting.remove(request)
                return self._error(request_id, "aborted", "aborted before it started")
        if request_id in self.running:
            self.aborted.add(request_id)

    # --- decoding ----------------------------------------------------------------------------
    def serve_forever(self) -> None:
        self._send(MessageType.OUTPUT, {"id": "engine", "kind": "ready", "reply": {"pid": os.getpid()}})
        while True:
            self._drain(0 if self.waiting else 50)
            self._expire()
            self._alive()
            if self.waiting:
                self._run(self._next_batch())
                self.progress += 1
                self._alive()

    def _generate(self, prompts: list, config: GenerationConfig, on_step):
        return paradec.generate(self.model, prompts, config, on_step=on_step)

    def _expire(self) -> None:
        now = time.monotonic()
        for request in [r for r in self.waiting if r.deadline is not None and now > r.deadline]:
            self.waiting.remove(request)
            self._error(request.id, "timeout", "timed out waiting for the engine")

    def _next_batch(self) -> list[Request]:
        first = self.waiting.popleft()
        batch = [first]
        for request in list(self.waiting):
            if len(batch) == self.max_batch:
                break
            if first.batches_with(request):
                self.waiting.remove(request)
                batch.append(request)
        return batch

    def _run(self, batch: list[Request]) -> None:
        self.running = {r.id: r for r in batch}
        layout = build_layout(self.model, batch[0].config)
        lengths = [e - s for s, e in layout.bodies]
        streaming = any(r.stream for r in batch)

        def on_step(progress: Progress) -> None:
            step = progress.step
            self.progress += 1
            self._drain(0)
            self._expire()
            self._alive()
            now = time.monotonic()
            for r in batch:
                if r.deadline is not None and now > r.deadline and r.id not in self.aborted:
                    self.aborted.add(r.id)
                    self._error(r.id, "timeout", f"timed out after {step} steps")
            if all(r.id in self.aborted for r in batch):
                raise _AllAborted
            if streaming:
                committed = progress.committed()  # [B, G]
                for i, r in enumerate(batch):
                    if r.stream and r.id not in self.aborted:
                        self._send(MessageType.OUTPUT, {"id": r.id, "kind": "progress", "step": step,
                                                        "committed": committed[i].tolist(), "lengths": lengths})

        started = time.monotonic()
        try:
            results = self._generate([r.prompt for r in batch], batch[0].config, on_step)
        except _AllAborted:
            results = None
        except RankFailure as e:  # a rank is gone: this engine cannot decode any more
            for r in batch:
                self._error(r.id, "failed", str(e))
            raise
        except Exception as e:  # noqa: BLE001 - one failed batch must not take the engine down
            log.exception("batch failed")
            results = None
            for r in batch:
                if r.id not in self.aborted:
                    self.aborted.add(r.id)
                    self._error(r.id, "failed", f"{type(e).__name__}: {e}")
        generate_s = time.monotonic() - started
        for i, r in enumerate(batch):
            if r.id in self.aborted or results is None:
                continue
            body = _result_body(results[i]) | {"engine_s": {"queued": started - r.arrived, "generate": generate_s}}
            self._send(MessageType.OUTPUT, {"id": r.id, "kind": "final", "result": body},
                       [results[i].token_ids, results[i].trace])
        for r in batch:  # aborted ones that did not yet get their ERROR
            if r.id in self.aborted and r.id not in self.errored:
                self._error(r.id, "aborted", "aborted while decoding")
        self.aborted.clear()
        self.errored.clear()
        self.running = {}


def _result_body(result) -> dict:
    return {"blocks": result.blocks, "summary": result.summary, "answer": result.answer, "nfe": result.nfe,
            "steps": result.steps, "timings": result.timings, "prompt_tokens": len(result.prompt_ids),
            "block_tokens": [len(b) for b in result.block_token_ids], "summary_tokens": len(result.summary_token_ids),
            "text": result.text, "finish_reason": result.finish_reason,
            "text_tokens": len(result.answerer.token_ids if result.answerer is not None else result.summary_token_ids)}


def run_engine(model_path, requests_address: str, outputs_address: str, max_batch: int = 8,
               device: str | None = None, limits: Limits = Limits()) -> None:
    """The engine process's entry point. model_path: a checkpoint or built-in name, or a callable
    ``model_path(device) -> DiffusionModel``."""
    import torch

    logging.basicConfig(level=logging.INFO, format="engine %(levelname)s %(message)s")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_path(device) if callable(model_path) else paradec.load(model_path, device=device)
    EngineLoop(model, requests_address, outputs_address, max_batch, limits).serve_forever()
