"""OpenAI-compatible HTTP on top of ``AsyncClient``: ``/v1/completions``,
``/v1/chat/completions`` (server-sent events with ``"stream": true``), ``/v1/models`` (and
``/v1/models/{id}``), ``/health`` and ``/metrics`` (Prometheus text). Tested with the official
``openai`` Python client.

Starlette (with uvicorn as the server): the maintained ASGI toolkit FastAPI itself is built on,
which is all four routes need — no schema framework on top.

Request bodies take OpenAI's fields (``prompt`` or ``messages`` — roles system (or developer, its
newer name), user and assistant, each with an optional ``name``, its ``content`` a string or a list
of text parts (joined by newlines), the fields a client echoes back from a reply (``refusal``,
``tool_calls``, ...) dropped where null; anything else refused naming ``messages[i]`` and the key —,
``max_tokens`` or ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``stream``, ``stream_options`` (with ``stream: true`` only), ``model``, ``user``, ``n``) and, as
extra fields, any request-level ``GenerationConfig`` setting (``blocks``, ``block_len``,
``tokens_per_step``, ``window``, ``top_k``, ...; ``protocol.REQUEST_SETTINGS``). ``prompt`` takes
OpenAI's four forms — a string, a list of strings, a list of token ids, a list of lists of token ids
(what lm-evaluation-harness's ``local-completions`` sends) — and a malformed one (an empty list, a
bool, a float, a list nested deeper, an id outside [0, 2**31)) is refused (400, ``param: "prompt"``)
naming where; the engine refuses ids outside its vocabulary. Each prompt is one request to the
engine and one choice (``index``: its position), at most ``max_prompts`` (the frontend's
``max_pending``) in one body; ``usage`` is summed over them, and so is a stream's usage chunk, sent
once at the end (the choices' chunks interleave, each naming its ``index``). One prompt refused
(busy, invalid) fails the whole request with its status, naming ``prompt[i]`` (with ``n`` > 1,
``choice k``), and the other choices' requests are aborted; a client that hangs up aborts them all.
A chat is one conversation. Without ``seed`` a request decodes with seed 0, as ``generate`` does:
the same request gets the same answer, sampled or not (where OpenAI's would vary); send a seed per
request for fresh samples. ``n`` > 1 asks ``n`` choices of each prompt: choice ``i * n + j`` is
prompt i's sample j, a request of its own decoded with ``seed + j`` (``seed``: the body's, else 0,
not a checkpoint's default seed), as ``generate(prompt_i, num_return_sequences=n, seed=seed)``
samples prompt i alone (greedy decoding gives n equal choices, where ``generate`` refuses n > 1);
the prompt's tokens count once in ``usage``, and prompts × n is bounded as the prompts are.
``max_tokens`` is ``max_new_tokens``: it bounds the answer text (the summary in ``nap``), and
``finish_reason`` is the result's — ``"length"`` when the text filled that bound, ``"stop"`` when an
EOS or a ``stop`` string ended it (the engine cuts at stop strings). ``usage.completion_tokens``
counts the answer text's tokens; the think blocks' tokens are
``usage.completion_tokens_details.reasoning_tokens`` and are not counted against ``max_tokens`` (the
canvas shape — ``blocks``, ``block_len`` — sets them); ``total_tokens`` is all three. ``top_p`` is
passed on, and dropped where it changes nothing (1, or temperature 0: greedy); outside [0, 1] it is
refused (400) even then, and so is a ``temperature`` that is not a finite number >= 0. What cannot
be honoured — ``logprobs``, ``top_logprobs``, ``presence_penalty``, ``frequency_penalty``,
``logit_bias``, ``tools``, ``tool_choice``, ``response_format``, ``echo``, ``best_of`` > 1,
``suffix``, ``store``, ``reasoning_effort``, ... and vLLM's ``min_tokens``, ``repetition_penalty``,
``ignore_eos``, ... (``_UNHONOURED``) — is refused (400) by name (lm-evaluation-harness's
loglikelihood requests, with ``logprobs`` and ``echo``, among them) in OpenAI's error shape
(``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``; the engine's refusal
of a setting has as ``param`` the field its message starts with — ``seed must ...``, ``config.top_k
...`` — when the body set it, else null), while their neutral values (``presence_penalty: 0``,
``logprobs: false``, ``store: false``, ``repetition_penalty: 1``, null, ...), which some clients
send by default, are accepted. A prompt and canvas longer than the model's positions get 400
``context_length_exceeded``, as OpenAI and vLLM answer; a 503 ``busy``, ``stalled``, or
``engine_dead`` while an engine (re)starts carries ``Retry-After: 1``; an unknown route or method
gets 404 / 405 in the same error shape. Unknown fields are refused (400), and so are process
settings (``rank_timeout_s``, ``prompt_kv``, ``gather``, ``results_on``, ``cuda_graphs``), by name.
A body over ``max_body_bytes`` is refused (413) before it is read (its Content-Length) or as soon
as it passes the limit (a chunked body); a body that is not UTF-8 JSON gets 400, and so does a
value no message can carry (an integer outside -2**63 to 2**64 - 1, a lone surrogate such as
``"\\ud800"``) or a ``stream`` that is not a boolean, by name and before a stream starts. Every
request has a server-side deadline (``timeout_s``: 504 after it; a body that has not all arrived
within it gets 408) and a non-streaming request whose client hangs up is aborted, as a stream is. A
stream answers 200 once the engine accepted every choice (queued it, past every refusal; a full
engine's queue does not hold the headers back): a request refused — ``busy`` (503), a setting the
engine refuses (400) — gets its status as without ``stream``. All HTTP requests share one ZeroMQ
connection to the frontend, and nothing one of them sends can break it: every message is checked
for size before it is sent. With a token (``paradec serve --token-file``), every route but
``/health`` needs ``Authorization: Bearer <token>`` (the scheme in any case). ``/health`` shows
health only. The completion text is the result's ``text`` (the summary in ``nap``, the answer
region outside it); the think blocks come in the extra ``paradec`` object, each choice's own (the
first's also at the top level, where a one-prompt client reads it; in a stream, each chunk's is its
choice's). Every chunk of a stream holds one choice. A chat stream starts with a chunk per choice
carrying ``{"role": "assistant", "content": ""}``; then a stream sends, for each choice, one chunk
per step with an empty delta and the canvas progress in ``paradec`` (a UI draws the blocks filling
in), then the text in one delta with the ``finish_reason``; then (with ``stream_options:
{"include_usage": true}``) a chunk with ``choices: []`` and ``usage``, then ``[DONE]``: each
choice's concatenated deltas are its whole text, as an OpenAI client expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import re
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from paradec.serve.client import Accepted, AsyncClient, Progress, ServedResult, ServeError
from paradec.config import GenerationConfig
from paradec.errors import ConfigError
from paradec.serve.protocol import (CHAT_ROLES, CONTEXT_EXCEEDED, OUTCOMES, PROCESS_SETTINGS, REFUSALS,
                                   REQUEST_SETTINGS, ProtocolError, capped, check_config, unencodable)

_SETTINGS = REQUEST_SETTINGS
_OPENAI = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "stop",
           "stream", "user", "top_p", "stream_options", "n"}
# OpenAI fields paradec cannot honour: field -> (is its value neutral, why not). A neutral value
# (what some clients send by default) is accepted and changes nothing; any other is refused by name.
_UNHONOURED = {
    "logprobs": (lambda v: v is None or v is False, "token log-probabilities are not returned"),
    "top_logprobs": (lambda v: v is None or (type(v) is int and v == 0), "token log-probabilities are not returned"),
    "presence_penalty": (lambda v: v is None or (type(v) in (int, float) and v == 0),
                         "a diffusion canvas is not sampled left to right: there are no penalties"),
    "frequency_penalty": (lambda v: v is None or (type(v) in (int, float) and v == 0),
                          "a diffusion canvas is not sampled left to right: there are no penalties"),
    "logit_bias": (lambda v: v is None or v == {}, "logit biases are not applied"),
    "tools": (lambda v: v is None or v == [], "tool calls are not produced"),
    "tool_choice": (lambda v: v is None or v == "none", "tool calls are not produced"),
    "parallel_tool_calls": (lambda v: v is None or isinstance(v, bool), "tool calls are not produced"),
    "response_format": (lambda v: v is None or v == {"type": "text"}, "the output is not constrained to a format"),
    "echo": (lambda v: v is None or v is False, "the prompt is not echoed"),
    "best_of": (lambda v: v is None or (type(v) is int and v == 1), "one request gets one result"),
    "suffix": (lambda v: v is None or v == "", "there is no insertion after a suffix"),
    "store": (lambda v: v is None or v is False, "completions are not stored"),
    "metadata": (lambda v: v is None or isinstance(v, dict), "metadata is a map of tags (kept nowhere)"),
    "service_tier": (lambda v: v in (None, "auto", "default"), "there is one service tier"),
    "reasoning_effort": (lambda v: v is None, "the think blocks' shape sets the reasoning: blocks, block_len"),
    "modalities": (lambda v: v is None or v == ["text"], "this model writes text only"),
    "prediction": (lambda v: v is None, "predicted outputs are not used"),
    # vLLM's extensions, at their defaults
    "min_tokens": (lambda v: v is None or (type(v) is int and v == 0), "the answer's length is not bounded below"),
    "repetition_penalty": (lambda v: v is None or (type(v) in (int, float) and v == 1),
                           "a diffusion canvas is not sampled left to right: there are no penalties"),
    "ignore_eos": (lambda v: v is None or v is False, "EOS ends the answer (eos_closes_block sets the think blocks')"),
    "skip_special_tokens": (lambda v: v is None or v is True, "special tokens are left out of the text"),
    "spaces_between_special_tokens": (lambda v: v is None or v is True, "special tokens are left out of the text"),
    "include_stop_str_in_output": (lambda v: v is None or v is False, "the text is cut before a stop string"),
    "stop_token_ids": (lambda v: v is None or v == [], "stop takes strings"),
    "add_generation_prompt": (lambda v: v is None or v is True, "the chat template adds the assistant's turn"),
    "chat_template_kwargs": (lambda v: v is None or v == {}, "the checkpoint's chat template is applied as it is"),
}
_STATUS = {"busy": 503, "invalid": 400, "too_large": 413, "unauthorized": 401, "aborted": 499, "timeout": 504,
           "failed": 500, "engine_dead": 503, "stalled": 503, "shutting_down": 503}
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_PROMPTS = 64  # the frontend's default max_pending: more prompts than that could never all be in flight
_TOKEN_IDS = (0, 1 << 31)  # a token id the wire carries (int32, not negative); the engine checks the vocabulary
_FORMS = "a string, a list of strings, a list of token ids or a list of lists of token ids"
# an engine refusal's first words, when they name a field: "seed must ...", "the prompt holds ...", "config.x ..."
_NAMED = re.compile(r"(?:(?:a|the) )?(?:config\.)?(\w+)")
_HEALTH = ("healthy", "state", "in_flight", "max_pending")  # what the open /health shows (no process ids)
# what a client echoes back from an assistant reply (null or empty there): dropped; any other value refused, this why
_ECHOED = {"refusal": "refusals are not produced", "tool_calls": "tool calls are not produced",
           "function_call": "tool calls are not produced", "audio": "this model reads text only",
           "annotations": "annotations are not produced"}
_TRANSIENT = ("busy", "stalled")  # 503s worth a retry soon (Retry-After): a full server, an engine restarting


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, code: str = "invalid", param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def create_app(address: str, token: str | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S,
               model_name: str = "paradec", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               max_prompts: int = DEFAULT_MAX_PROMPTS) -> Starlette:
    """The HTTP app; it talks to the frontend at ``address`` as an AsyncClient. timeout_s: every
    request's deadline (sent as its ``timeout_s``: the frontend enforces it). max_body_bytes: the
    largest request body read. model_name: the one model ``/v1/models`` lists. max_prompts: the
    most prompts one completions body may hold (each is a request in flight: the frontend's
    ``max_pending``)."""
    if timeout_s is not None and not 0 < timeout_s < math.inf:  # inf, nan: every request would be refused
        raise ConfigError(f"timeout_s must be a finite number > 0 or None, got {timeout_s}")
    state: dict = {}
    card = {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "paradec"}

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
        return await _complete(request, client(), chat=False, model_name=model_name, max_body_bytes=max_body_bytes,
                               timeout_s=timeout_s, max_prompts=max_prompts)

    async def chat(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return await _complete(request, client(), chat=True, model_name=model_name, max_body_bytes=max_body_bytes,
                               timeout_s=timeout_s, max_prompts=max_prompts)

    async def models(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        return JSONResponse({"object": "list", "data": [card]})

    async def model(request: Request) -> Response:
        if not authorised(request):
            return _error(401, "unauthorized", "a missing or wrong bearer token")
        if request.path_params["model_id"] != model_name:
            return _error(404, "model_not_found", f"model {capped(request.path_params['model_id'], 256)!r} is not "
                          f"served: this server serves one model, {model_name!r}", param="model")
        return JSONResponse(card)

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
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={404: _no_route, 405: _no_route})


def _settings(body: dict, chat: bool, max_prompts: int = DEFAULT_MAX_PROMPTS) -> tuple[list, dict, bool, bool, int]:
    """(prompts — one chat's messages, or each of a completions ``prompt`` —, GenerationConfig
    overrides, stream, include_usage, n: choices per prompt) from an OpenAI body."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    process = sorted(set(body) & PROCESS_SETTINGS)
    if process:
        raise BadRequest(f"{process} are process settings, the server operator's (they would apply to other "
                         f"clients' requests too); a request may set {sorted(_SETTINGS)}", param=process[0])
    unknown = sorted(set(body) - _OPENAI - _SETTINGS - set(_UNHONOURED))
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; OpenAI's {sorted(_OPENAI)} and paradec's {sorted(_SETTINGS)}",
                         param=unknown[0])
    for name, (neutral, why) in _UNHONOURED.items():
        if name in body and not neutral(body[name]):
            raise BadRequest(f"{name}={capped(repr(body[name]), 80)} cannot be honoured: {why}", param=name,
                             code="unsupported_parameter")
    for name, value in body.items():  # JSON allows what a message cannot carry: refused here, before a stream starts
        why = unencodable(value, name)
        if why is not None:
            raise BadRequest(why, param=name)
    body = {k: v for k, v in body.items() if v is not None or k not in _OPENAI}  # OpenAI's null: not given
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest(f"stream must be a boolean (true or false) or null, got {capped(repr(body['stream']), 80)}",
                         param="stream")
    if not isinstance(body.get("model", ""), str) or len(body.get("model") or "") > 256:
        raise BadRequest("model must be a string of at most 256 characters", param="model")
    key = "messages" if chat else "prompt"
    prompt = body.get(key)
    if chat and not (isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt)):
        raise BadRequest("messages must be a non-empty list of {role, content, name?}", param="messages")
    prompts = [[_chat_message(message, i) for i, message in enumerate(prompt)]] if chat else _prompts(prompt)
    if len(prompts) > max_prompts:
        raise BadRequest(f"prompt holds {len(prompts)} prompts, over the limit of {max_prompts} (each is a request in "
                         f"flight, and the server holds at most {max_prompts}); send them in several bodies",
                         param="prompt")
    n = body.get("n", 1)
    if type(n) is not int or n < 1:
        raise BadRequest(f"n must be an integer >= 1, got {capped(repr(n), 80)}", param="n")
    if len(prompts) * n > max_prompts:
        raise BadRequest(f"n={n} choices for each of {len(prompts)} prompts are {len(prompts) * n} requests, over the "
                         f"limit of {max_prompts} (the most the server holds in flight); send fewer", param="n")
    overrides = {k: v for k, v in body.items() if k in _SETTINGS and k not in ("stop", "top_p", "temperature")}
    if n > 1:  # choice j samples with seed + j, as num_return_sequences does
        seed = overrides.setdefault("seed", GenerationConfig.seed)
        if type(seed) is not int or not 0 <= seed <= 2**63 - n:
            raise BadRequest(f"seed must be an integer in [0, 2**63 - n] with n={n} (choice j samples with seed + j), "
                             f"got {capped(repr(seed), 80)}", param="seed")
    for name in ("temperature", "top_p"):
        if name in body and (isinstance(body[name], bool) or not isinstance(body[name], int | float)):
            raise BadRequest(f"{name} must be a number, got {capped(repr(body[name]), 80)}", param=name)
    if "temperature" in body and not 0 <= body["temperature"] < math.inf:  # not: NaN too
        raise BadRequest(f"temperature must be a finite number >= 0, got {body['temperature']!r}",
                         param="temperature")
    if "top_p" in body and not 0 <= body["top_p"] <= 1:  # refused even where it would be dropped (greedy)
        raise BadRequest(f"top_p must lie in [0, 1] (above 0 when sampling), got {body['top_p']!r}", param="top_p")
    if "temperature" in body:
        overrides["temperature"] = float(body["temperature"])
    temperature = overrides.get("temperature", GenerationConfig.temperature)
    if "top_p" in body and body["top_p"] != 1 and temperature != 0:  # top_p 1, or greedy decoding: a no-op
        overrides["top_p"] = float(body["top_p"])
    bounds = {k: body[k] for k in ("max_tokens", "max_completion_tokens", "max_new_tokens") if k in body}
    for name, value in bounds.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise BadRequest(f"{name} must be an integer >= 1, got {capped(repr(value), 80)}", param=name)
    if len(set(bounds.values())) > 1:
        raise BadRequest(f"{bounds} disagree: each is the answer text's bound (max_new_tokens); give one",
                         param=sorted(bounds)[-1])
    if bounds:
        overrides["max_new_tokens"] = next(iter(bounds.values()))
    stop = body.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadRequest("stop must be a string or a list of strings", param="stop")
    if any(stop):
        overrides["stop"] = [s for s in stop if s]  # the engine cuts the text and ends decoding where it can
    options = body.get("stream_options", {})
    if "stream_options" in body and not body.get("stream", False):
        raise BadRequest("stream_options applies to a stream: give it with stream true, or leave it out (or null)",
                         param="stream_options")
    if not (isinstance(options, dict) and set(options) <= {"include_usage"}
            and isinstance(options.get("include_usage", False), bool)):
        raise BadRequest("stream_options takes include_usage (a boolean)", param="stream_options")
    try:
        check_config(overrides)  # each value a bounded scalar, before anything is sent
    except ProtocolError as e:
        raise BadRequest(str(e), 413 if e.code == "too_large" else 400, e.code,
                         _param(str(e), _fields(overrides, body, chat))) from None
    return prompts, overrides, body.get("stream", False), options.get("include_usage", False), n


def _prompts(prompt) -> list:
    """A completions ``prompt`` in any of OpenAI's forms as a list of prompts, each a string or a
    list of token ids; what is not one of the forms is refused naming where it goes wrong."""
    if isinstance(prompt, str):
        return [prompt]
    if not (isinstance(prompt, list) and prompt):
        raise BadRequest(f"prompt must be {_FORMS} (none empty); got {capped(repr(prompt), 80)}", param="prompt")
    if all(isinstance(p, str) for p in prompt):
        return prompt
    if all(isinstance(p, list) for p in prompt):
        prompts, names = prompt, [f"prompt[{i}]" for i in range(len(prompt))]
    else:  # one prompt of token ids
        prompts, names = [prompt], ["prompt"]
    for ids, name in zip(prompts, names):
        if not ids:
            raise BadRequest(f"{name} is an empty list of token ids", param="prompt")
        for j, token in enumerate(ids):
            if type(token) is not int or not _TOKEN_IDS[0] <= token < _TOKEN_IDS[1]:  # not a bool, a float, a list
                raise BadRequest(f"{name}[{j}] must be a token id (an integer in [0, 2**31)), got "
                                 f"{capped(repr(token), 80)}: prompt takes {_FORMS}", param="prompt")
    return prompts


def _chat_message(message: dict, index: int) -> dict:
    """An OpenAI chat message as the wire's ``{role, content, name?}``: ``developer`` (OpenAI's
    newer name for ``system``) as ``system``; the fields a client echoes back from an assistant
    reply (``refusal``, ``tool_calls``, ...) dropped where null or empty; ``content`` as a list of
    text parts joined by newlines. Anything else is refused naming ``messages[index]`` and the key."""
    where = f"messages[{index}]"
    role = message.get("role")
    if role not in (*CHAT_ROLES, "developer"):  # first: a tool message's tool_call_id is not what is wrong with it
        raise BadRequest(f"{where}.role must be one of {list(CHAT_ROLES) + ['developer']}, got {capped(repr(role), 80)}"
                         + ("; tool calls are not produced" if role in ("tool", "function") else ""), param="messages")
    for key in sorted(set(message) - {"role", "content", "name"}):
        if key not in _ECHOED or message[key] not in (None, []):
            why = _ECHOED.get(key, "a message takes role, content and name only")
            raise BadRequest(f"{where}.{key}={capped(repr(message[key]), 80)} cannot be taken: {why}",
                             param="messages")
    message = {k: v for k, v in message.items() if k in ("role", "content") or (k == "name" and v is not None)}
    if role == "developer":
        message["role"] = "system"
    content = message.get("content")
    if isinstance(content, list):
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"{where}.content[{j}] must be a text part {{'type': 'text', 'text': str}}: "
                                 f"this model reads text only", param="messages")
        message["content"] = "\n".join(part["text"] for part in content)
    elif not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts, got {capped(repr(content), 80)}",
                         param="messages")
    if not isinstance(message.get("name", ""), str):
        raise BadRequest(f"{where}.name must be a string, got {capped(repr(message['name']), 80)}", param="messages")
    return message


_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
          408: "invalid_request_error", 413: "invalid_request_error", 499: "invalid_request_error",
          401: "authentication_error", 503: "server_error", 504: "server_error"}


def _error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape; ``code`` is paradec's (busy, timeout, ...) or OpenAI's."""
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def _error(status: int, code: str, message: str, param: str | None = None,
           headers: dict | None = None) -> JSONResponse:
    if code in _TRANSIENT:
        headers = (headers or {}) | {"Retry-After": "1"}
    return JSONResponse(_error_body(status, code, message, param), status_code=status, headers=headers)


async def _no_route(request: Request, exc) -> JSONResponse:
    """404 and 405 in OpenAI's error shape (Starlette's own are plain text)."""
    code = "not_found" if exc.status_code == 404 else "method_not_allowed"
    return _error(exc.status_code, code, f"{request.method} {capped(request.url.path, 256)}: {exc.detail}; "
                  f"routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /v1/models/{{id}}, "
                  f"GET /health, GET /metrics", headers=exc.headers)  # (a 405's Allow)


async def _read_json(request: Request, limit: int, timeout_s: float | None = None):
    """The body as JSON: refused (413) past ``limit`` bytes — by its Content-Length before a byte
    is read, else as soon as the stream passes the limit —, (408) when it has not all arrived
    within ``timeout_s`` (a client that stalls mid-body) and (400) when it is not UTF-8 JSON."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BadRequest("Content-Length is not a number")
        if int(length) > limit:
            raise BadRequest(f"the body is {int(length)} bytes, over the limit of {limit}", 413, "too_large")
    try:
        async with asyncio.timeout(timeout_s):
            data = await _read_body(request, limit)
    except TimeoutError:
        raise BadRequest(f"the body did not arrive within {timeout_s:g} s", 408, "timeout") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadRequest(f"the body is not UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError):
        raise BadRequest("the body is not JSON") from None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body's bytes, refused (413) as soon as they pass ``limit``."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"the body is over the limit of {limit} bytes", 413, "too_large")
            chunks.append(chunk)
    except ClientDisconnect:  # hung up mid-body: nobody to answer, nothing to log
        raise BadRequest("the client hung up before its body ended", 499, "aborted") from None
    return b"".join(chunks)


async def _until_done_or_gone(request: Request, task: asyncio.Task):
    """``task``'s result; when the HTTP client hangs up first (or the server cancels this
    handler at shutdown), the task is cancelled instead: its stream aborts the request."""
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ServeError("aborted", "the HTTP client hung up")
    finally:
        task.cancel()  # a no-op once it is done


async def _complete(request: Request, client: AsyncClient, chat: bool, model_name: str,
                    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, timeout_s: float | None = None,
                    max_prompts: int = DEFAULT_MAX_PROMPTS) -> Response:
    try:
        body = await _read_json(request, max_body_bytes, timeout_s)
        prompts, overrides, stream, include_usage, n = _settings(body, chat, max_prompts)
    except BadRequest as e:
        return _error(e.status, e.code, str(e), e.param)
    request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = body.get("model") or model_name
    # choice i * n + j: prompt i's sample j, a request of its own with seed + j (prompt-major, as OpenAI orders them)
    streams = [client.stream(prompt, progress=stream, accepted=stream, request_id=f"{request_id}-{i * n + j}",
                             **(overrides | ({"seed": overrides["seed"] + j} if j else {})))
               for i, prompt in enumerate(prompts) for j in range(n)]
    names = _choice_names(len(prompts), n, chat)
    # a stream answers 200 once the engine accepted every choice (its first event): a refusal (busy, invalid)
    # keeps its status, and a full engine's queue does not hold the headers back
    try:
        firsts = await _until_done_or_gone(request, asyncio.ensure_future(_first_events(streams)))
    except _Failed as e:
        return _failure(e.error, chat, _fields(overrides, body, chat), names[e.index])
    except ServeError as e:  # the HTTP client hung up (every choice's request is aborted)
        return _failure(e, chat, {})
    if stream:
        return StreamingResponse(_events(streams, firsts, request_id, chat, created, model, include_usage, n, names),
                                 media_type="text/event-stream")
    await _close(streams)  # ended already (their results came): a no-op
    choices = [{"index": index, "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason, "paradec": _extra(result)} if chat
               else {"index": index, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None,
                     "paradec": _extra(result)} for index, result in enumerate(firsts)]
    return JSONResponse({"id": request_id, "object": "chat.completion" if chat else "text_completion",
                         "created": created, "model": model, "choices": choices,
                         "usage": _usage(list(enumerate(firsts)), n), "paradec": _extra(firsts[0])})


def _choice_names(prompts: int, n: int, chat: bool) -> list[str | None]:
    """What a failure's message calls each choice: nothing for a body of one, else its prompt
    (``prompt[i]``) and, with n > 1, its index among the choices."""
    if prompts * n == 1:
        return [None]
    if n == 1:
        return [f"prompt[{i}]" for i in range(prompts)]
    return [f"choice {i * n + j}" + ("" if chat else f" (prompt[{i}], sample {j})")
            for i in range(prompts) for j in range(n)]


class _Failed(Exception):
    """The request of choice ``index`` failed with ``error`` (the others are aborted)."""

    def __init__(self, index: int, error: Exception):
        super().__init__(index, error)
        self.index, self.error = index, error


async def _next_event(streams: list, index: int):
    """The next event of ``streams[index]``; its failure raised as ``_Failed``."""
    try:
        return await streams[index].__anext__()
    except (ServeError, ProtocolError, TimeoutError) as e:
        raise _Failed(index, e) from None


async def _close(streams: list) -> None:
    """Closes every stream: a request still in flight is aborted at the server."""
    for events in streams:
        await events.aclose()


async def _stop(tasks, streams: list) -> None:
    """Cancels ``tasks`` (each waiting on an event of ``streams``), then closes every stream."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _close(streams)


async def _first_events(streams: list) -> list:
    """Each stream's first event, in order. When one fails (``_Failed``), or this is cancelled
    (the HTTP client hung up), every stream is closed: the other choices' requests are aborted."""
    tasks = [asyncio.ensure_future(_next_event(streams, index)) for index in range(len(streams))]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        await _stop(tasks, streams)
        raise


async def _merged(streams: list, firsts: list):
    """(index, event) of every stream as its events come (the choices' events interleave): each
    stream's first event (received already), then the rest until its result. A failure raises
    ``_Failed``; a failure or leaving early closes every stream (their requests are aborted)."""
    pending: dict[asyncio.Task, int] = {}
    try:
        for index, event in enumerate(firsts):
            yield index, event
            if not isinstance(event, ServedResult):  # Accepted or Progress: more to come
                pending[asyncio.ensure_future(_next_event(streams, index))] = index
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                index = pending.pop(task)
                event = task.result()
                yield index, event
                if not isinstance(event, ServedResult):
                    pending[asyncio.ensure_future(_next_event(streams, index))] = index
    finally:
        await _stop(pending, streams)


def _fields(overrides: dict, body: dict, chat: bool) -> dict:
    """The body's field for each name an engine refusal may start with: the settings sent (the
    answer's bound as the body named it) and the prompt."""
    fields = {name: name for name in overrides}
    fields.update({"max_new_tokens": name for name in ("max_tokens", "max_completion_tokens") if name in body})
    fields["prompt"] = "messages" if chat else "prompt"
    return fields


def _param(message: str, fields: dict) -> str | None:
    """The body field a refusal's message names by its first words ("seed must ...", "the
    prompt holds ...", "config.top_k ..."), when the request sent one of that name; else None."""
    named = _NAMED.match(message)
    return fields.get(named.group(1)) if named else None


def _failure(error: Exception, chat: bool, fields: dict, name: str | None = None) -> JSONResponse:
    """A request that failed before its answer started: its status and OpenAI's error shape
    (``name``: which of several choices failed, named in the message)."""
    if isinstance(error, ProtocolError):
        param = "messages" if chat else "prompt"
    elif isinstance(error, ServeError) and error.code in ("invalid", "too_large"):
        param = _param(error.message, fields)
    else:
        param = None
    retry = {"Retry-After": "1"} if getattr(error, "restarting", False) else None  # EngineDead, an engine (re)starting
    return _error(_error_status(error), _error_code(error), _message(error, name), param, retry)


def _message(error: Exception, name: str | None) -> str:
    """A failure's text, naming its choice (``name``) when the body asked for several."""
    return str(error) if name is None else f"{name}: {error}"


def _error_status(error: Exception) -> int:
    """The HTTP status of a request's failure: a ServeError's by its code, a ProtocolError's
    (refused before sending: a malformed chat message, a prompt too long) 413 or 400, a timeout 504."""
    if _context_exceeded(error):
        return 400
    if isinstance(error, ServeError):
        return _STATUS.get(error.code, 500)
    if isinstance(error, ProtocolError):
        return 413 if error.code == "too_large" else 400
    return 504


def _error_code(error: Exception) -> str:
    if _context_exceeded(error):
        return "context_length_exceeded"  # OpenAI's code (and status, 400) for a prompt and answer too long
    return error.code if isinstance(error, ServeError | ProtocolError) else "timeout"


def _context_exceeded(error: Exception) -> bool:
    """Whether the engine refused the prompt and canvas as longer than the model's positions."""
    return isinstance(error, ServeError) and error.code == "too_large" and CONTEXT_EXCEEDED in error.message


async def _events(streams, firsts, request_id, chat, created, model, include_usage=False, n=1, names=(None,)):
    """The stream's server-sent events: a chat's role delta for every choice, then every choice's
    events as they come (each chunk names its choice's ``index``), then (``include_usage``) one
    chunk with the usage summed over them, then ``[DONE]``."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list, extra: dict | None = None, **fields) -> str:
        event = {"id": request_id, "object": kind, "created": created, "model": model, "choices": choices,
                 **fields, "paradec": extra or {}}
        return "data: " + json.dumps(event) + "\n\n"

    def choice(index: int, text: str | None, finish: str | None, role: bool = False) -> dict:
        if not chat:
            return {"index": index, "text": text or "", "finish_reason": finish, "logprobs": None}
        delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
        return {"index": index, "delta": delta, "finish_reason": finish}

    results = []
    try:
        for index in range(len(streams) if chat else 0):  # one choice a chunk, as every chunk here
            yield chunk([choice(index, None, None, role=True)])
        async with contextlib.aclosing(_merged(streams, firsts)) as events:  # left early: every request aborted
            async for index, event in events:
                if isinstance(event, Accepted):  # the headers went out on these: nothing to show
                    continue
                if isinstance(event, Progress):
                    yield chunk([choice(index, None, None)], {"step": event.step, "committed": event.committed,
                                                              "lengths": event.lengths})
                else:
                    results.append((index, event))
                    yield chunk([choice(index, event.text, event.finish_reason)],
                                {**_extra(event), "usage": _usage([(0, event)])})
        if include_usage:
            yield chunk([], usage=_usage(results, n))
    except _Failed as e:
        error, message = e.error, _message(e.error, names[e.index])
        yield "data: " + json.dumps(_error_body(_error_status(error), _error_code(error), message)) + "\n\n"
    finally:  # (closed before the merge began, at the chat's role chunk: the requests are aborted here)
        await _close(streams)
    yield "data: [DONE]\n\n"


def _usage(results: list[tuple[int, ServedResult]], n: int = 1) -> dict:
    """Summed over ``results`` (each with its choice's index; n choices a prompt): prompt_tokens,
    each prompt's once; completion_tokens, the answer texts' (each bounded by max_tokens);
    reasoning_tokens, the think blocks' (set by the canvas shape, not by max_tokens); total_tokens,
    all of them."""
    prompt = sum(result.prompt_tokens for index, result in results if index % n == 0)
    completion = sum(result.text_tokens for _, result in results)
    reasoning = sum(sum(result.block_tokens) for _, result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion + reasoning,
            "completion_tokens_details": {"reasoning_tokens": reasoning}}


def _extra(result: ServedResult) -> dict:
    return {"blocks": result.blocks, "summary": result.summary, "answer": result.answer, "nfe": result.nfe,
            "steps": result.steps, "finish_reason": result.finish_reason}


def _prometheus(stats: dict, healthy: bool) -> str:
    lines = ["# HELP paradec_requests_total Requests by outcome.", "# TYPE paradec_requests_total counter"]
    for outcome in ("accepted", *OUTCOMES, *REFUSALS):
        lines.append(f'paradec_requests_total{{outcome="{outcome}"}} {stats.get(outcome, 0)}')
    lines += ["# HELP paradec_in_flight Requests in flight.", "# TYPE paradec_in_flight gauge",
              f"paradec_in_flight {stats.get('in_flight', 0)}",
              "# HELP paradec_engine_healthy 1 while the engine is up and making progress.",
              "# TYPE paradec_engine_healthy gauge", f"paradec_engine_healthy {int(healthy)}",
              "# HELP paradec_engine_restarts_total Engines started after one died or stalled.",
              "# TYPE paradec_engine_restarts_total counter",
              f"paradec_engine_restarts_total {stats.get('restarts', 0)}"]
    return "\n".join(lines) + "\n"
