"""OpenAI-compatible HTTP on top of ``AsyncClient``: ``/v1/completions``,
``/v1/chat/completions`` (server-sent events with ``"stream": true``), ``/health`` and
``/metrics`` (Prometheus text).

Starlette (with uvicorn as the server): the maintained ASGI toolkit FastAPI itself is built on,
which is all four routes need — no schema framework on top.

Request bodies take OpenAI's fields (``prompt`` or ``messages``, ``max_tokens``, ``temperature``,
``seed``, ``stop``, ``stream``, ``model``) and, as extra fields, any request-level
``GenerationConfig`` setting (``blocks``, ``block_len``, ``tokens_per_step``, ``window``, ...;
``protocol.REQUEST_SETTINGS``). Unknown fields are refused (400), and so are process settings
(``rank_timeout_s``, ``prompt_kv``, ``gather``, ``results_on``, ``cuda_graphs``), by name. A body
over ``max_body_bytes`` is refused (413) before it is read (its Content-Length) or as soon as it
passes the limit (a chunked body); a body that is not UTF-8 JSON gets 400. Every request has a
server-side deadline (``timeout_s``: 504 after it) and a non-streaming request whose client hangs
up is aborted, as a stream is. All HTTP requests share one ZeroMQ connection to the frontend, and
nothing one of them sends can break it: every message is checked for size before it is sent.
With a token (``paradec serve --token-file``), every route but ``/health`` needs
``Authorization: Bearer <token>`` (the scheme in any case). ``/health`` shows health only.
The completion text is the summary (the answer region outside ``nap``); the think blocks come in
the extra ``paradec`` object. A stream sends one chunk per step with an empty delta and the
canvas progress in ``paradec`` (a UI draws the blocks filling in), then the text in one delta,
then ``[DONE]``: concatenated deltas are the whole text, as an OpenAI client expects.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from paradec.serve.client import AsyncClient, Progress, ServedResult, ServeError
from paradec.serve.protocol import PROCESS_SETTINGS, REQUEST_SETTINGS, ProtocolError, check_config

_SETTINGS = REQUEST_SETTINGS
_OPENAI = {"model", "prompt", "messages", "max_tokens", "temperature", "seed", "stop", "stream", "n", "user",
           "top_p", "stream_options"}
_STATUS = {"busy": 503, "invalid": 400, "too_large": 413, "unauthorized": 401, "aborted": 499, "timeout": 504,
           "failed": 500, "engine_dead": 503, "stalled": 503, "shutting_down": 503}
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_BODY_BYTES = 1 << 20
_HEALTH = ("healthy", "state", "in_flight", "max_pending")  # what the open /health shows (no process ids)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid"):
        super().__init__(message)
        self.status, self.code = status, code


def create_app(address: str, token: str | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
               model_name: str = "paradec", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Starlette:
    """The HTTP app; it talks to the frontend at ``address`` as an AsyncClient. timeout_s: every
    request's deadline (sent as its ``timeout_s``: the frontend enforces it). max_body_bytes: the
    largest request body read."""
    state: dict = {}

    def client() -> AsyncClient:
        if "client" not in state:  # made inside the server's event loop
            state["client"] = AsyncClient(address, token=token, timeout_s=timeout_s)
        return state["client"]

    def authorised(request: Request) -> bool:
        """With a token, every route but /health needs ``Authorization: Bearer <token>``."""
        if token is None:
            return True
        scheme, _, given = request.headers.get("authorization", "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("utf-8"),
                                                                  token.encode("utf-8"))

    async def completions(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return await _complete(request, client(), chat=False, model_name=model_name, max_body_bytes=max_body_bytes)

    async def chat(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return await _complete(request, client(), chat=True, model_name=model_name, max_body_bytes=max_body_bytes)

    async def health(request: Request) -> Response:
        try:
            reply = await client().health(timeout_s=5)
        except (ServeError, TimeoutError) as e:
            return JSONResponse({"healthy": False, "error": str(e)}, status_code=503)
        shown = {k: reply[k] for k in _HEALTH if k in reply}
        return JSONResponse(shown, status_code=200 if reply["healthy"] else 503)

    async def metrics(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        try:
            stats = await client().stats(timeout_s=5)
            healthy = (await client().health(timeout_s=5))["healthy"]
        except (ServeError, TimeoutError) as e:
            return _error(503, "unavailable", str(e))
        return PlainTextResponse(_prometheus(stats, healthy), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ])


def _settings(body: dict, chat: bool) -> tuple[object, dict, list[str], bool]:
    """(prompt or messages, GenerationConfig overrides, stop strings, stream) from an OpenAI body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    process = sorted(set(body) & PROCESS_SETTINGS)
    if process:
        raise BadRequest(f"{process} are process settings, the server operator's (they would apply to other "
                         f"clients' requests too); a request may set {sorted(_SETTINGS)}")
    unknown = sorted(set(body) - _OPENAI - _SETTINGS)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; OpenAI's {sorted(_OPENAI)} and paradec's {sorted(_SETTINGS)}")
    if not isinstance(body.get("model", ""), str | None) or len(body.get("model") or "") > 256:
        raise BadRequest("model must be a string of at most 256 characters")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1")
    key = "messages" if chat else "prompt"
    prompt = body.get(key)
    if chat and not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise BadRequest("messages must be a non-empty list of {role, content}")
    if not chat and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    # OpenAI's stop and top_p keep their HTTP meaning here (stop: the text is cut; top_p: accepted, not applied)
    overrides = {k: v for k, v in body.items() if k in _SETTINGS and k not in ("stop", "top_p")}
    if "temperature" in body:
        if isinstance(body["temperature"], bool) or not isinstance(body["temperature"], int | float):
            raise BadRequest(f"temperature must be a number, got {body['temperature']!r}")
        overrides["temperature"] = float(body["temperature"])
    if "max_tokens" in body and "answer_len" not in body and body.get("mode", "nap") != "nap":
        overrides["answer_len"] = body["max_tokens"]
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop must be a string or a list of strings")
    try:
        check_config(overrides)  # each value a bounded scalar, before anything is sent
    except ProtocolError as e:
        raise BadRequest(str(e), 413 if e.code == "too_large" else 400, e.code) from None
    return prompt, overrides, stop, bool(body.get("stream", False))


def _cut(text: str, stop: list[str]) -> tuple[str, str]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, "stop")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status_code=status)


async def _read_json(request: Request, limit: int):
    """The body as JSON: refused (413) past ``limit`` bytes — by its Content-Length before a byte
    is read, else as soon as the stream passes the limit — and (400) when it is not UTF-8 JSON."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(length) > limit:
            raise BadRequest(f"the body is {int(length)} bytes, over the limit of {limit}", 413, "too_large")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the body is over the limit of {limit} bytes", 413, "too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing to log
        raise BadRequest("the client hung up before its body ended", 499, "aborted") from None
    try:
        return json.loads(b"".join(chunks).decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None


async def _until_done_or_gone(request: Request, task: asyncio.Task, client: AsyncClient, request_id: str):
    """``task``'s result; when the HTTP client hangs up first (or the server cancels this
    handler at shutdown), the request is aborted instead."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ServeError("aborted", "the HTTP client hung up")
    finally:
        if not task.done():
            task.cancel()
            await client.abort(request_id)


async def _complete(request: Request, client: AsyncClient, chat: bool, model_name: str,
                    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> Response:
    try:
        body = await _read_json(request, max_body_bytes)
        prompt, overrides, stop, stream = _settings(body, chat)
    except BadRequest as e:
        return _error(e.status, e.code, str(e))
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = body.get("model") or model_name
    if stream:
        return StreamingResponse(_events(client, request_id, prompt, overrides, stop, chat, created, model),
                                 media_type="text/event-stream")
    try:
        task = asyncio.ensure_future(client.generate(prompt, request_id=request_id, **overrides))
        result = await _until_done_or_gone(request, task, client, request_id)
    except ServeError as e:
        return _error(_STATUS.get(e.code, 500), e.code, str(e))
    except ProtocolError as e:  # refused before sending: a malformed chat message, a prompt over the limit
        return _error(413 if e.code == "too_large" else 400, e.code, str(e))
    except TimeoutError as e:
        return _error(504, "timeout", str(e))
    text, finish = _cut(result.summary, stop)
    choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
              else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
    return JSONResponse({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": model, "choices": [choice], "usage": _usage(result),
                         "paradec": _extra(result)})


async def _events(client, request_id, prompt, overrides, stop, chat, created, model):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, extra: dict) -> str:
        choice = ({"index": 0, "delta": {} if text is None else {"content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text or "", "finish_reason": finish})
        return "data: " + json.dumps({"id": request_id, "object": kind, "created": created, "model": model,
                                      "choices": [choice], "paradec": extra}) + "\n\n"

    try:
        async for event in client.stream(prompt, request_id=request_id, **overrides):
            if isinstance(event, Progress):
                yield chunk(None, None, {"step": event.step, "committed": event.committed, "lengths": event.lengths})
            elif isinstance(event, ServedResult):
                text, finish = _cut(event.summary, stop)
                yield chunk(text, finish, {**_extra(event), "usage": _usage(event)})
    except (ServeError, ProtocolError) as e:
        yield "data: " + json.dumps({"error": {"message": str(e), "type": e.code, "code": e.code}}) + "\n\n"
    except TimeoutError as e:
        yield "data: " + json.dumps({"error": {"message": str(e), "type": "timeout", "code": "timeout"}}) + "\n\n"
    except BaseException:  # the HTTP client went away: stop decoding for it
        await client.abort(request_id)
        raise
    yield "data: [DONE]\n\n"


def _usage(result: ServedResult) -> dict:
    completion = sum(result.block_tokens) + result.summary_tokens
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _extra(result: ServedResult) -> dict:
    return {"blocks": result.blocks, "summary": result.summary, "answer": result.answer, "nfe": result.nfe,
            "steps": result.steps}


def _prometheus(stats: dict, healthy: bool) -> str:
    lines = ["# HELP paradec_requests_total Requests by outcome.", "# TYPE paradec_requests_total counter"]
    for outcome in ("accepted", "finished", "errors", "aborted", "timeout", "stalled", "engine_dead", "shutting_down",
                    "disconnected", "undelivered", "busy", "invalid", "unauthorized", "unavailable"):
        lines.append(f'paradec_requests_total{{outcome="{outcome}"}} {stats.get(outcome, 0)}')
    lines += ["# HELP paradec_in_flight Requests in flight.", "# TYPE paradec_in_flight gauge",
              f"paradec_in_flight {stats.get('in_flight', 0)}",
              "# HELP paradec_engine_healthy 1 while the engine is up and making progress.",
              "# TYPE paradec_engine_healthy gauge", f"paradec_engine_healthy {int(healthy)}",
              "# HELP paradec_engine_restarts_total Engines started after one died or stalled.",
              "# TYPE paradec_engine_restarts_total counter", f"paradec_engine_restarts_total {stats.get('restarts', 0)}"]
    return "\n".join(lines) + "\n"
