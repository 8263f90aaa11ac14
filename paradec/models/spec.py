"""Model facts the decoder needs, read from the checkpoint (DESIGN.md contract 6)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_THINK_HEADER = "<think #{i}>"
DEFAULT_SUMMARY_HEADER = "<summary>"


@dataclass(frozen=True)
class ModelSpec:
    """What a decoding loop must know about a model and never hard-code.

    stop_ids: every id that ends a generation (EOS and end-of-turn tokens), EOS first.
    shift_logits: True when the logits at position i - 1 predict token i (Dream).
    think_header: header text of think block i, a template with ``{i}`` counted from 1;
    summary_header: the summary's header text. When the tokenizer holds a header as one
    (special) token, that token is the header; otherwise the header is plain text.
    """

    family: str
    vocab_size: int
    mask_id: int
    stop_ids: tuple[int, ...]
    pad_id: int | None
    shift_logits: bool
    max_length: int
    think_header: str = DEFAULT_THINK_HEADER
    summary_header: str = DEFAULT_SUMMARY_HEADER

    @property
    def eos_id(self) -> int:
        return self.stop_ids[0]
