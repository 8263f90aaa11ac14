"""Small word-level tokenizers, built with the ``tokenizers`` library and saved so that
transformers' ``AutoTokenizer`` (and so ``paradec.load``) reads them.

Special tokens: EOS (also the padding token, as in LLaDA), the mask token, an unknown-word
token, one header token per think block (``<think #1>`` … ``<think #8>``) and ``<summary>``,
so that NAP canvas headers are single tokens the user's text can never produce.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from paradec.models.spec import DEFAULT_SUMMARY_HEADER, DEFAULT_THINK_HEADER

EOS = "<|endoftext|>"
MASK = "<|mask|>"
UNK = "<unk>"
MAX_THINK_HEADERS = 8


def special_tokens() -> list[str]:
    return [EOS, MASK, UNK] + [DEFAULT_THINK_HEADER.format(i=i) for i in range(1, MAX_THINK_HEADERS + 1)] + [
        DEFAULT_SUMMARY_HEADER
    ]


def build_word_tokenizer(words: Iterable[str], root: str | Path | None = None):
    """A ``PreTrainedTokenizerFast`` over the special tokens then ``words`` (whitespace and
    punctuation split, as ``tokenizers``' Whitespace pre-tokenizer does); saved to ``root`` when
    given."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens()
    vocab = {tok: i for i, tok in enumerate(specials)}
    for w in sorted(set(words) - set(specials)):
        vocab[w] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        pad_token=EOS,
        mask_token=MASK,
        unk_token=UNK,
        additional_special_tokens=specials[3:],
    )
    if root is not None:
        tokenizer.save_pretrained(root)
    return tokenizer
