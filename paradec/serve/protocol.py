"""The wire: typed msgpack messages over ZeroMQ, tensors as raw frames, never pickle.

A message is a multipart ZeroMQ message ``[type, body, *buffers]``: one type byte, one msgpack
map (the body) and zero or more raw buffers (little-endian int32 token ids). Every body is
checked against its type's schema when it is decoded: unknown types, unknown fields, missing
fields, wrong field types and oversize frames are refused with a ``ProtocolError`` naming what
was wrong. docs/wire.md describes the same thing for other stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import msgpack
import numpy as np

from paradec.config import GenerationConfig
from paradec.errors import InputError


class MessageType(IntEnum):
    ADD = 1  # client -> server: a generation request
    ABORT = 2  # client -> server: stop a request
    UTILITY = 3  # client -> server: health, stats
    OUTPUT = 4  # server -> client: progress, the final result, a utility reply
    ERROR = 5  # server -> client: a request (or a message) failed; final for that request
    ENGINE_DEAD = 6  # server -> client: the engine died; final for every request in flight


class ProtocolError(InputError):
    """A message that does not follow the wire format; ``code`` is what ERROR carries."""

    def __init__(self, message: str, code: str = "invalid"):
        super().__init__(capped(message))  # it may quote what a client sent: never all of it
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 1 << 20  # any one frame
    max_frames: int = 4
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 8192
    max_canvas_tokens: int = 8192  # a request's canvas (or answer region), headers included
    max_id_chars: int = 64
    max_setting_chars: int = 64  # a config value that is a string (a policy's name), a chat role
    max_message_chars: int = 2000  # the text an ERROR carries: never an echo of a whole field


# Request-level settings: what a client may set. Everything else in GenerationConfig is a process
# setting (how ranks talk, how steps are launched, how long a rank waits): the operator's, never a
# client's, because it can hurt other requests (rank_timeout_s=1e-6 ends a multi-rank engine).
# A GenerationConfig field added later is a process setting until it is listed here.
REQUEST_SETTINGS = frozenset({
    "mode", "blocks", "block_len", "summary_len", "answer_len", "steps", "tokens_per_step", "schedule",
    "policy", "threshold", "factor", "temperature", "seed", "attention", "summary", "eos_closes_block",
    "bar_eos_in_blocks", "summary_min_tokens", "chat_template", "window", "cache", "refresh_every",
    "partial_refresh", "delayed_kv",
    "max_new_tokens", "stop", "top_k", "top_p", "score_on", "rank_temperature"})
# Request settings a server does not take: one request gets one result (send n requests instead).
UNSERVED_SETTINGS = frozenset({"num_return_sequences"})
PROCESS_SETTINGS = frozenset(f for f in GenerationConfig.__dataclass_fields__
                             if f not in REQUEST_SETTINGS and f not in UNSERVED_SETTINGS)
# the engine's refusal of a prompt and canvas longer than the model's positions ends with this
CONTEXT_EXCEEDED = "exceed the model's maximum length"
CHAT_ROLES = ("system", "user", "assistant")  # a chat message's roles (paradec.api.encode_prompt's)
MAX_LIST_ITEMS = 16  # a setting that is a list (stop strings): this many short scalars at most
# field -> (accepted Python types after msgpack decoding, required)
_ID = (str,)
SCHEMAS: dict[MessageType, dict[str, tuple[tuple[type, ...], bool]]] = {
    MessageType.ADD: {"id": (_ID, True), "prompt": ((str, type(None)), False), "messages": ((list,), False),
                      "config": ((dict,), False),
                      "stream": ((bool,), False), "timeout_s": ((int, float, type(None)), False),
                      "token": ((str,), False), "accepted": ((bool,), False)},
    MessageType.ABORT: {"id": (_ID, True), "token": ((str,), False)},
    MessageType.UTILITY: {"id": (_ID, True), "method": ((str,), True), "token": ((str,), False)},
    MessageType.OUTPUT: {"id": (_ID, True), "kind": ((str,), True), "step": ((int,), False),
                         "committed": ((list,), False), "lengths": ((list,), False), "result": ((dict,), False),
                         "reply": ((dict,), False)},
    MessageType.ERROR: {"id": ((str, type(None)), True), "code": ((str,), True), "message": ((str,), True),
                        "refused": ((bool,), False)},
    MessageType.ENGINE_DEAD: {"id": ((str, type(None)), True), "message": ((str,), True),
                              "restarting": ((bool,), False)},
}
# "ready" and "alive" go from the engine to the frontend only: the engine started; its progress
# "accepted": the engine queued the request (sent where its ADD asked, ``accepted: true``)
# the ``stats`` counters (docs/wire.md): every accepted request ends as one outcome; refusals are not accepted
OUTCOMES = ("finished", "refused", "errors", "aborted", "timeout", "stalled", "engine_dead", "shutting_down",
            "disconnected", "undelivered")
REFUSALS = ("busy", "invalid", "unauthorized", "unavailable")
OUTPUT_KINDS = ("progress", "final", "utility", "ready", "alive", "accepted")
UTILITY_METHODS = ("health", "stats")
ERROR_CODES = ("invalid", "unauthorized", "busy", "aborted", "timeout", "failed", "too_large", "stalled",
               "shutting_down")
# raw buffers each type may carry: ADD an optional prompt as token ids; a final OUTPUT token_ids and trace
_BUFFERS = {MessageType.ADD: 1, MessageType.OUTPUT: 2}


@dataclass
class Message:
    type: MessageType
    body: dict
    buffers: list[np.ndarray] = field(default_factory=list)  # int32 arrays

    @property
    def id(self) -> str | None:
        return self.body.get("id")


def encode(kind: MessageType, body: dict, buffers: list | None = None, limits: Limits = Limits()) -> list[bytes]:
    """Frames of one message. The body is checked against the schema first, an ERROR's text is
    cut to ``limits.max_message_chars``, and a frame over ``limits.max_frame_bytes`` is refused
    here (ProtocolError ``too_large``), before anything is sent: the other side would drop it
    and the connection with it. A value msgpack cannot carry (``unencodable``: an integer past 64
    bits, a lone surrogate) is a ProtocolError ``invalid`` naming its field."""
    if kind in (MessageType.ERROR, MessageType.ENGINE_DEAD) and isinstance(body.get("message"), str):
        body = {**body, "message": capped(body["message"], limits.max_message_chars)}
    arrays = [np.ascontiguousarray(b, dtype="<i4") for b in (buffers or [])]
    _check_body(kind, body, len(arrays), limits)
    try:
        packed = msgpack.packb(body, use_bin_type=True)
    except (OverflowError, UnicodeEncodeError, ValueError, TypeError) as e:  # JSON allows what msgpack cannot hold
        raise ProtocolError(unencodable(body) or f"the body of a {kind.name} message cannot be encoded as msgpack "
                            f"({type(e).__name__}: {e})") from None
    frames = [bytes([kind]), packed] + [a.tobytes() for a in arrays]
    big = [i for i, f in enumerate(frames) if len(f) > limits.max_frame_bytes]
    if big:
        raise ProtocolError(f"frame {big[0]} of this {kind.name} message is {len(frames[big[0]])} bytes, over the "
                            f"limit of {limits.max_frame_bytes}", code="too_large")
    return frames


MSGPACK_INTS = (-(1 << 63), (1 << 64) - 1)  # the integers msgpack encodes: int64's least to uint64's largest


def unencodable(value, name: str = "") -> str | None:
    """Why ``value`` cannot be msgpack-encoded, naming where in it (``name``: its own name, e.g.
    ``"seed"``; a body's fields are named by their keys: ``config.seed``, ``messages[0].content``):
    an integer outside ``MSGPACK_INTS`` or a string that is not UTF-8 (a lone surrogate such as
    ``"\\ud800"``, which JSON allows). None when nothing in it is either. Walks maps and lists
    without recursion (a body may nest as deep as JSON allows)."""
    stack = [(name, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, int) and not isinstance(item, bool) and not MSGPACK_INTS[0] <= item <= MSGPACK_INTS[1]:
            return (f"{where or 'the value'} must lie in -2**63 to 2**64 - 1 (the integers a message can carry); "
                    f"got one {'below' if item < 0 else 'above'} that range")
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as e:
                return (f"{where or 'the value'} is not valid Unicode text: it holds a lone surrogate "
                        f"{item[e.start]!r} at character {e.start}")
        elif isinstance(item, dict):
            for key, inner in reversed(item.items()):
                label = capped(str(key), 80)
                stack.append((f"{where}.{label}" if where else label, inner))
                stack.append((f"{where or 'a map'} key {label!r}", key))
        elif isinstance(item, (list, tuple)):
            stack.extend((f"{where}[{i}]", inner) for i, inner in reversed(list(enumerate(item))))
    return None


def capped(text: str, limit: int = Limits.max_message_chars) -> str:
    """``text``, or its first ``limit`` characters and how many were cut."""
    if len(text) <= limit:
        return text
    return f"{text[: max(0, limit - 40)]}... ({len(text) - max(0, limit - 40)} characters cut)"


def check_config(config: dict, limits: Limits = Limits()) -> None:
    """A client's config map: allow-listed request settings only (process settings are refused by
    name), each value a scalar of bounded size. Types and ranges are GenerationConfig's to check;
    this keeps what reaches it (and what an error may echo) small."""
    for name, value in config.items():
        if not isinstance(name, str):
            raise ProtocolError(f"config keys are strings; got a {type(name).__name__}")
        if name in UNSERVED_SETTINGS:
            raise ProtocolError(f"config.{name} is not served: one request gets one result; send several requests")
        if name in PROCESS_SETTINGS:
            raise ProtocolError(f"config.{name} is a process setting, the server operator's (it would apply to "
                                f"other clients' requests too); a request may set {sorted(REQUEST_SETTINGS)}")
        if name not in REQUEST_SETTINGS:
            raise ProtocolError(f"unknown setting config.{capped(name, limits.max_setting_chars)}; a request may set "
                                f"{sorted(REQUEST_SETTINGS)}")
        items = value if isinstance(value, list) and len(value) <= MAX_LIST_ITEMS else [value]
        for item in items:
            if isinstance(item, str) and len(item) > limits.max_setting_chars:
                raise ProtocolError(f"config.{name} holds a string of {len(item)} characters, over the limit of "
                                    f"{limits.max_setting_chars}", code="too_large")
        if not all(item is None or isinstance(item, (bool, int, float, str)) for item in items):
            size = f" of {len(value)} items" if isinstance(value, (list, dict, bytes)) else ""
            raise ProtocolError(f"config.{name} must be a number, a string, a bool, null or a list of at most "
                                f"{MAX_LIST_ITEMS} of those; got a {type(value).__name__}{size}",
                                code="too_large" if size else "invalid")


def decode(frames: list[bytes], limits: Limits = Limits()) -> Message:
    """A message from its frames, or a ProtocolError saying what is wrong with them."""
    if not 2 <= len(frames) <= limits.max_frames:
        raise ProtocolError(f"a message has 2 to {limits.max_frames} frames (type, body, buffers); got {len(frames)}")
    big = [i for i, f in enumerate(frames) if len(f) > limits.max_frame_bytes]
    if big:
        raise ProtocolError(f"frame {big[0]} is {len(frames[big[0]])} bytes, over the limit of "
                            f"{limits.max_frame_bytes}", code="too_large")
    if len(frames[0]) != 1:
        raise ProtocolError(f"the type frame is one byte; got {len(frames[0])} bytes")
    try:
        kind = MessageType(frames[0][0])
    except ValueError:
        raise ProtocolError(f"unknown message type {frames[0][0]}; known: "
                            f"{', '.join(f'{t.value} ({t.name})' for t in MessageType)}") from None
    try:
        body = msgpack.unpackb(frames[1], raw=False, strict_map_key=True, use_list=True)  # size checked above
    except (ValueError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError, TypeError) as e:
        raise ProtocolError(f"the body of a {kind.name} message is not valid msgpack ({type(e).__name__}: {e})") from None
    buffers = frames[2:]
    _check_body(kind, body, len(buffers), limits)
    arrays = []
    for i, b in enumerate(buffers):
        if len(b) % 4:
            raise ProtocolError(f"buffer {i} of a {kind.name} message is {len(b)} bytes, not whole int32 values")
        arrays.append(np.frombuffer(b, dtype="<i4"))
    return Message(kind, body, arrays)


def _check_body(kind: MessageType, body, buffers: int, limits: Limits = Limits()) -> None:
    if not isinstance(body, dict):
        raise ProtocolError(f"the body of a {kind.name} message is a map; got {type(body).__name__}")
    schema = SCHEMAS[kind]
    if not all(isinstance(k, str) for k in body):
        raise ProtocolError(f"the keys of a {kind.name} message's body are strings")
    unknown = sorted(set(body) - set(schema))
    if unknown:
        raise ProtocolError(f"unknown fields {unknown} in a {kind.name} message; allowed: {sorted(schema)}")
    for name, (types, required) in schema.items():
        if name not in body:
            if required:
                raise ProtocolError(f"a {kind.name} message needs the field {name!r}")
            continue
        value = body[name]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            allowed = " or ".join(t.__name__ for t in types)
            raise ProtocolError(f"field {name!r} of a {kind.name} message must be {allowed}; "
                                f"got {type(value).__name__}")
    if isinstance(body.get("id"), str) and not 0 < len(body["id"]) <= limits.max_id_chars:
        raise ProtocolError(f"id must be 1 to {limits.max_id_chars} characters")
    if buffers > _BUFFERS.get(kind, 0):
        raise ProtocolError(f"a {kind.name} message carries at most {_BUFFERS.get(kind, 0)} buffers; got {buffers}")
    if kind == MessageType.ADD:
        given = (body.get("prompt") is not None) + ("messages" in body) + (buffers > 0)
        if given != 1:
            raise ProtocolError("an ADD message carries its prompt as text ('prompt'), as chat 'messages' or as "
                                "one int32 buffer of token ids: exactly one of them")
        chars = len(body["prompt"]) if isinstance(body.get("prompt"), str) else 0
        for turn in body.get("messages", []):
            if not (isinstance(turn, dict) and {"role", "content"} <= set(turn) <= {"role", "content", "name"}
                    and all(isinstance(v, str) for v in turn.values())):
                raise ProtocolError("each of 'messages' is a map of 'role' and 'content' and an optional 'name', "
                                    "all strings")
            if turn["role"] not in CHAT_ROLES:
                raise ProtocolError(f"a chat role is one of {list(CHAT_ROLES)}, got {capped(turn['role'], 80)!r}")
            if len(turn.get("name", "")) > limits.max_setting_chars:
                raise ProtocolError(f"a message name is {len(turn['name'])} characters, over the limit of "
                                    f"{limits.max_setting_chars}", code="too_large")
            chars += len(turn["content"])
        if chars > limits.max_prompt_chars:
            raise ProtocolError(f"the prompt is {chars} characters, over the limit of {limits.max_prompt_chars}",
                                code="too_large")
        if body.get("timeout_s") is not None and not 0 < body["timeout_s"] < float("inf"):
            raise ProtocolError(f"timeout_s must be a finite number > 0, got {body['timeout_s']}")
        check_config(body.get("config") or {}, limits)
    if kind == MessageType.UTILITY and body["method"] not in UTILITY_METHODS:
        raise ProtocolError(f"method must be one of {list(UTILITY_METHODS)}, got {body['method']!r}")
    if kind == MessageType.OUTPUT and body["kind"] not in OUTPUT_KINDS:
        raise ProtocolError(f"an OUTPUT's kind must be one of {list(OUTPUT_KINDS)}, got {body['kind']!r}")
    if kind == MessageType.ERROR and body["code"] not in ERROR_CODES:
        raise ProtocolError(f"an ERROR's code must be one of {list(ERROR_CODES)}, got {body['code']!r}")
