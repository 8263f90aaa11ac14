"""OpenAI-compatible HTTP on top of ``AsyncClient``: ``/v1/completions``,
``/v1/chat/completions`` (server-sent events with ``"stream": true``), ``/health`` and
``/metrics`` (Prometheus text).

Starlette (with uvicorn as the server): the maintained ASGI toolkit FastAPI itself is built on,
which is all four routes need — no schema framework on top.

Request bodies take OpenAI's fields (``prompt`` or ``messages``, ``max_tokens``, ``temperature``,
``seed``, ``stop``, ``stream``, ``model``) and, as extra fields, any ``GenerationConfig`` setting
(``blocks``, ``block_len``, ``tokens_per_step``, ``window``, ...). Unknown fields are refused.
With a token (``paradec serve --token``), every route but ``/health`` needs ``Authorization:
Bearer <token>``.
The completion text is the summary (the answer region outside ``nap``); the think blocks come in
the extra ``paradec`` object. A stream sends one chunk per step with an empty delta and the
canvas progress in ``paradec`` (a UI draws the blocks filling in), then the text in one delta,
then ``[DONE]``: concatenated deltas are the whole text, as an OpenAI client expects.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from paradec.config import GenerationConfig
from paradec.serve.client import AsyncClient, Progress, ServedResult, ServeError
from paradec.serve.protocol import ProtocolError

_SETTINGS = {f.name for f in dataclasses.fields(GenerationConfig)}
_OPENAI = {"model", "prompt", "messages", "max_tokens", "temperature", "seed", "stop", "stream", "n", "user",
           "top_p", "stream_options"}
_STATUS = {"busy": 503, "invalid": 400, "too_large": 413, "unauthorized": 401, "aborted": 499, "timeout": 504,
           "failed": 500, "engine_dead": 503}


class BadRequest(Exception):
    pass


def create_app(address: str, token: str | None = None, timeout_s: float | None = None,
               model_name: str = "paradec") -> Starlette:
    """The HTTP app; it talks to the frontend at ``address`` as an AsyncClient."""
    state: dict = {}

    def client() -> AsyncClient:
        if "client" not in state:  # made inside the server's event loop
            state["client"] = AsyncClient(address, token=token, timeout_s=timeout_s)
        return state["client"]

    def authorised(request: Request) -> bool:
        """With a token, every route but /health needs ``Authorization: Bearer <token>``."""
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode("utf-8"), f"Bearer {token}".encode("utf-8"))

    async def completions(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return await _complete(request, client(), chat=False, model_name=model_name)

    async def chat(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return await _complete(request, client(), chat=True, model_name=model_name)

    async def health(request: Request) -> Response:
        try:
            reply = await client().health(timeout_s=5)
        except (ServeError, TimeoutError) as e:
            return JSONResponse({"healthy": False, "error": str(e)}, status_code=503)
        return JSONResponse(reply, status_code=200 if reply["healthy"] else 503)

    async def metrics(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        stats = await client().stats(timeout_s=5)
        healthy = (await client().health(timeout_s=5))["healthy"]
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
    unknown = sorted(set(body) - _OPENAI - _SETTINGS)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; OpenAI's {sorted(_OPENAI)} and paradec's {sorted(_SETTINGS)}")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1")
    key = "messages" if chat else "prompt"
    prompt = body.get(key)
    if chat and not (isinstance(prompt, list) and prompt):
        raise BadRequest("messages must be a non-empty list of {role, content}")
    if not chat and not isinstance(prompt, str):
        raise BadRequest("prompt must be a string")
    overrides = {k: v for k, v in body.items() if k in _SETTINGS}
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
    return prompt, overrides, stop, bool(body.get("stream", False))


def _cut(text: str, stop: list[str]) -> tuple[str, str]:
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], "stop") if cuts else (text, "stop")


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status_code=status)


async def _complete(request: Request, client: AsyncClient, chat: bool, model_name: str) -> Response:
    try:
        body = await request.json()
    except json.JSONDecodeError:
        return _error(400, "invalid", "the body is not JSON")
    try:
        prompt, overrides, stop, stream = _settings(body, chat)
    except BadRequest as e:
        return _error(400, "invalid", str(e))
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = body.get("model") or model_name
    if stream:
        return StreamingResponse(_events(client, request_id, prompt, overrides, stop, chat, created, model),
                                 media_type="text/event-stream")
    try:
        result = await client.generate(prompt, request_id=request_id, **overrides)
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
    for outcome in ("accepted", "finished", "errors", "aborted", "busy", "invalid", "unauthorized", "engine_dead",
                    "disconnected"):
        lines.append(f'paradec_requests_total{{outcome="{outcome}"}} {stats.get(outcome, 0)}')
    lines += ["# HELP paradec_in_flight Requests in flight.", "# TYPE paradec_in_flight gauge",
              f"paradec_in_flight {stats.get('in_flight', 0)}",
              "# HELP paradec_engine_healthy 1 while the engine process is alive.", "# TYPE paradec_engine_healthy gauge",
              f"paradec_engine_healthy {int(healthy)}"]
    return "\n".join(lines) + "\n"
