"""Training data curation, as NAP does it: one problem, several independent reasoning paths
and the answer become one canvas instance in exactly the layout the decoder uses, or, for the
baseline, one long chain of thought holding the same paths one after another.

Canvas instance: ``prompt [H1 R1] … [Hm Rm] [HS S]`` where each body is the path's tokens then
EOS up to ``block_len`` (the summary up to ``summary_len``), built with the decoder's own
``canvas_layout`` and prompt encoding, so training and decoding cannot drift apart. Long-CoT
instance: ``prompt A`` with ``A = "path 1 : R1 … path m : Rm summary : S"`` then EOS up to the
canvas's length plus room for the markers (``CanvasFormat.longcot_len``). Questions are encoded
as decoding encodes prompts (chat template included); bodies as plain text. Examples that do not fit (a path or the summary too long, a path count the
format does not allow, no answer in the summary, an empty question, words the tokenizer does not
know) are reported one by one with a count, never truncated into wrong supervision.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from paradec.answers import extract_answer
from paradec.api import encode_text
from paradec.canvas import canvas_layout, check_headers
from paradec.config import GenerationConfig
from paradec.errors import ConfigError
from paradec.models.attention import PAD, PROMPT
from paradec.models.loading import header_ids
from paradec.models.spec import DEFAULT_SUMMARY_HEADER, DEFAULT_THINK_HEADER

# Roles of positions in a training instance.
ROLE_PAD, ROLE_PROMPT, ROLE_HEADER, ROLE_BODY = -1, 0, 1, 2
FORMATS = ("nap", "longcot")


@dataclass(frozen=True)
class ReasoningExample:
    """question: the prompt's text; paths: independent reasoning traces (they may hold errors);
    answer: the right final answer; summary: the summary block's text (default
    ``#### {answer}``), which must state the answer."""

    question: str
    paths: tuple[str, ...]
    answer: str
    summary: str | None = None

    @property
    def summary_text(self) -> str:
        return self.summary if self.summary is not None else f"#### {self.answer}"


@dataclass(frozen=True)
class CanvasFormat:
    """The canvas the instances are cut to: think bodies of ``block_len`` tokens, a summary
    body of ``summary_len``, and the path counts (think blocks) allowed."""

    block_len: int
    summary_len: int
    path_counts: tuple[int, ...] = (2, 3, 4)
    think_header: str = DEFAULT_THINK_HEADER
    summary_header: str = DEFAULT_SUMMARY_HEADER

    def longcot_len(self, paths: int) -> int:
        """The long-CoT answer region: the canvas of ``paths`` blocks, with room for the
        ``path i :`` and ``summary :`` markers in place of the headers."""
        return paths * (self.block_len + 3) + self.summary_len + 2


@dataclass(frozen=True)
class Instance:
    """One training sequence: token ids, attention segments and roles, each [T] long."""

    ids: list[int]
    segments: list[int]
    roles: list[int]


@dataclass
class CurationReport:
    """How many examples became instances, and every one that did not, with why."""

    kept: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (example index, reason)

    @property
    def counts(self) -> Counter:
        return Counter(reason.split(":")[0] for _, reason in self.rejected)

    def summary(self) -> str:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
        return f"{self.kept} kept, {len(self.rejected)} rejected" + (f" ({parts})" if parts else "")


class CurationError(ValueError):
    """An example that does not fit the format; the message starts with a short reason."""


def _prompt(tokenizer, text: str, chat_template: bool) -> list[int]:
    """The question's ids exactly as ``paradec.generate`` encodes a prompt."""
    if not text.strip():
        raise CurationError("empty question: the prompt has no text")
    return _known(tokenizer, encode_text(tokenizer, text, chat_template), "question")


def _tokens(tokenizer, text: str, what: str) -> list[int]:
    """A body's ids: plain text, never the chat template, never special tokens."""
    ids = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return _known(tokenizer, ids, what)


def _known(tokenizer, ids: list[int], what: str) -> list[int]:
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        raise CurationError(f"unknown words: the {what} holds {ids.count(unk)} word(s) the tokenizer does not know")
    return ids


def _check(example: ReasoningExample, fmt: CanvasFormat) -> None:
    if len(example.paths) not in fmt.path_counts:
        raise CurationError(f"path count: {len(example.paths)} paths, the format allows {list(fmt.path_counts)}")
    if not str(example.answer).strip():
        raise CurationError("missing answer: the example has no answer")
    stated = extract_answer(example.summary_text)
    if stated is None or stated != str(example.answer).replace(",", ""):
        raise CurationError(f"summary without the answer: the summary states {stated!r}, the answer is {example.answer!r}")


def nap_instance(tokenizer, example: ReasoningExample, fmt: CanvasFormat, eos_id: int, mask_id: int,
                 chat_template: bool = True) -> Instance:
    """The canvas instance of ``example`` (raises CurationError when it does not fit)."""
    _check(example, fmt)
    m = len(example.paths)
    bodies = [_tokens(tokenizer, p, f"path {i + 1}") for i, p in enumerate(example.paths)]
    bodies.append(_tokens(tokenizer, example.summary_text, "summary"))
    limits = [fmt.block_len] * m + [fmt.summary_len]
    for i, (body, limit) in enumerate(zip(bodies, limits)):
        if len(body) > limit:
            what = f"path {i + 1}" if i < m else "summary"
            raise CurationError(f"too long: {what} has {len(body)} tokens, its block holds {limit}")
    names = [fmt.think_header.format(i=i + 1) for i in range(m)] + [fmt.summary_header]
    headers = tuple(tuple(header_ids(tokenizer, name)) for name in names)
    layout = _nap_layout(m, fmt.block_len, fmt.summary_len, mask_id, headers, tokenizer.unk_token_id, tuple(names))
    canvas = layout.template.clone()
    for g, body in enumerate(bodies):
        start, end = layout.bodies[g]
        canvas[start:end] = torch.tensor(body + [eos_id] * (end - start - len(body)))
    prompt = _prompt(tokenizer, example.question, chat_template)
    roles = torch.where(layout.editable, ROLE_BODY, ROLE_HEADER)
    return Instance(
        ids=prompt + canvas.tolist(),
        segments=[PROMPT] * len(prompt) + layout.segments.tolist(),
        roles=[ROLE_PROMPT] * len(prompt) + roles.tolist(),
    )


@lru_cache(maxsize=64)
def _nap_layout(m: int, block_len: int, summary_len: int, mask_id: int, headers: tuple[tuple[int, ...], ...],
                unk_id: int | None, names: tuple[str, ...]):
    """The decoder's own canvas layout (cached: every example of m paths shares it, and the
    headers are checked once)."""
    config = GenerationConfig(mode="nap", blocks=m, block_len=block_len, summary_len=summary_len)
    check_headers([list(h) for h in headers], unk_id, list(names))
    return canvas_layout(config, mask_id, [list(h) for h in headers])


def longcot_text(example: ReasoningExample) -> str:
    steps = [f"path {i + 1} : {p}" for i, p in enumerate(example.paths)]
    return " ".join(steps + [f"summary : {example.summary_text}"])


def longcot_instance(tokenizer, example: ReasoningExample, fmt: CanvasFormat, eos_id: int, mask_id: int,
                     chat_template: bool = True) -> Instance:
    """The same paths as one chain of thought, in one answer region as long as the canvas."""
    _check(example, fmt)
    length = fmt.longcot_len(len(example.paths))
    answer = _tokens(tokenizer, longcot_text(example), "chain of thought")
    if len(answer) > length:
        raise CurationError(f"too long: the chain of thought has {len(answer)} tokens, the region holds {length}")
    layout = canvas_layout(GenerationConfig(mode="ao", answer_len=length), mask_id)
    prompt = _prompt(tokenizer, example.question, chat_template)
    return Instance(
        ids=prompt + answer + [eos_id] * (length - len(answer)),
        segments=[PROMPT] * len(prompt) + layout.segments.tolist(),
        roles=[ROLE_PROMPT] * len(prompt) + [ROLE_BODY] * length,
    )


BUILDERS = {"nap": nap_instance, "longcot": longcot_instance}


def curate(tokenizer, examples, fmt: CanvasFormat, kind: str, eos_id: int, mask_id: int, chat_template: bool = True,
           ) -> tuple[list[Instance], CurationReport]:
    """Instances of every example that fits; the report names each one that does not.
    chat_template: encode questions through the tokenizer's chat template, as decoding does
    by default (``GenerationConfig.chat_template``)."""
    if kind not in BUILDERS:
        raise ConfigError(f"kind must be one of {list(BUILDERS)}, got {kind!r}")
    build = BUILDERS[kind]
    instances, report = [], CurationReport()
    for i, example in enumerate(examples):
        try:
            instances.append(build(tokenizer, example, fmt, eos_id, mask_id, chat_template))
            report.kept += 1
        except CurationError as err:
            report.rejected.append((i, str(err)))
    return instances, report


def pack(instances: list[Instance], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors: ids, segments, roles [N, T] (PAD segment and role on padding)."""
    if not instances:
        raise ConfigError("no instances to pack (every example was rejected?)")
    width = max(len(x.ids) for x in instances)
    out = {
        "ids": torch.full((len(instances), width), pad_id, dtype=torch.int32),
        "segments": torch.full((len(instances), width), PAD, dtype=torch.int8),
        "roles": torch.full((len(instances), width), ROLE_PAD, dtype=torch.int8),
    }
    for n, x in enumerate(instances):
        k = len(x.ids)
        out["ids"][n, :k] = torch.tensor(x.ids, dtype=torch.int32)
        out["segments"][n, :k] = torch.tensor(x.segments, dtype=torch.int8)
        out["roles"][n, :k] = torch.tensor(x.roles, dtype=torch.int8)
    return out
