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
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_frame_bytes: int = 1 << 20  # any one frame
    max_frames: int = 4
    max_prompt_chars: int = 32_768
    max_prompt_tokens: int = 8192
    max_canvas_tokens: int = 8192  # a request's canvas (or answer region), headers included
    max_id_chars: int = 64


# field -> (accepted Python types after msgpack decoding, required)
_ID = (str,)
SCHEMAS: dict[MessageType, dict[str, tuple[tuple[type, ...], bool]]] = {
    MessageType.ADD: {"id": (_ID, True), "prompt": ((str, type(None)), False), "messages": ((list,), False),
                      "config": ((dict,), False),
                      "stream": ((bool,), False), "timeout_s": ((int, float, type(None)), False),
                      "token": ((str,), False)},
    MessageType.ABORT: {"id": (_ID, True), "token": ((str,), False)},
    MessageType.UTILITY: {"id": (_ID, True), "method": ((str,), True), "token": ((str,), False)},
    MessageType.OUTPUT: {"id": (_ID, True), "kind": ((str,), True), "step": ((int,), False),
                         "committed": ((list,), False), "lengths": ((list,), False), "result": ((dict,), False),
                         "reply": ((dict,), False)},
    MessageType.ERROR: {"id": ((str, type(None)), True), "code": ((str,), True), "message": ((str,), True)},
    MessageType.ENGINE_DEAD: {"id": ((str, type(None)), True), "message": ((str,), True)},
}
OUTPUT_KINDS = ("progress", "final", "utility", "ready")
UTILITY_METHODS = ("health", "stats")
ERROR_CODES = ("invalid", "unauthorized", "busy", "aborted", "timeout", "failed", "too_large")
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


def encode(kind: MessageType, body: dict, buffers: list | None = None) -> list[bytes]:
    """Frames of one message (the body is checked against the schema first)."""
    arrays = [np.ascontiguousarray(b, dtype="<i4") for b in (buffers or [])]
    _check_body(kind, body, len(arrays))
    return [bytes([kind]), msgpack.packb(body, use_bin_type=True)] + [a.tobytes() for a in arrays]


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
            if not (isinstance(turn, dict) and set(turn) == {"role", "content"}
                    and all(isinstance(v, str) for v in turn.values())):
                raise ProtocolError("each of 'messages' is a map of exactly 'role' and 'content', both strings")
            chars += len(turn["content"])
        if chars > limits.max_prompt_chars:
            raise ProtocolError(f"the prompt is {chars} characters, over the limit of {limits.max_prompt_chars}",
                                code="too_large")
        if body.get("timeout_s") is not None and not body["timeout_s"] > 0:
            raise ProtocolError(f"timeout_s must be > 0, got {body['timeout_s']}")
    if kind == MessageType.UTILITY and body["method"] not in UTILITY_METHODS:
        raise ProtocolError(f"method must be one of {list(UTILITY_METHODS)}, got {body['method']!r}")
    if kind == MessageType.OUTPUT and body["kind"] not in OUTPUT_KINDS:
        raise ProtocolError(f"an OUTPUT's kind must be one of {list(OUTPUT_KINDS)}, got {body['kind']!r}")
    if kind == MessageType.ERROR and body["code"] not in ERROR_CODES:
        raise ProtocolError(f"an ERROR's code must be one of {list(ERROR_CODES)}, got {body['code']!r}")
