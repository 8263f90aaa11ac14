"""paradec.generate() refuses bad input before any work, naming the field and its range."""

from __future__ import annotations

import pytest

import paradec
from paradec import ConfigError, GenerationConfig, InputError
from paradec.api import build_layout, encode_prompt
from paradec.decoding.runner import Runner

from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=21)
    return paradec.load(root)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"blocks": 0}, r"blocks must be an int >= 1, got 0"),
        ({"block_len": -3}, r"block_len must be an int >= 1, got -3"),
        ({"summary_len": 0}, r"summary_len must be an int >= 1"),
        ({"answer_len": 0}, r"answer_len must be an int >= 1"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"tokens_per_step": -1}, r"tokens_per_step must be an int >= 1"),
        ({"threshold": 0.0}, r"threshold must lie in \(0, 1\], got 0.0"),
        ({"threshold": 1.5}, r"threshold must lie in \(0, 1\], got 1.5"),
        ({"policy": "greedy"}, r"policy must be one of \['confidence', 'entropy', 'factor', 'margin', 'threshold'\], got 'greedy'"),
        ({"mode": "blocks"}, r"mode must be one of \['nap', 'ao', 'ar_order', 'random', 'block'\], got 'blocks'"),
        ({"window": 4, "mode": "ao"}, r"window applies to mode='nap' only"),
        ({"window": 4, "mode": "block"}, r"window applies to mode='nap' only \(block mode's window is block_len\)"),
        ({"window": 0}, r"window must be an int >= 1, got 0"),
        ({"window": 4, "summary": "concurrent"}, r"window needs summary='after'"),
        ({"cache": "dual"}, r"cache='dual' applies to windowed decoding"),
        ({"cache": "both", "mode": "block"}, r"cache must be one of \['none', 'prefix', 'dual'\], got 'both'"),
        ({"refresh_every": 2, "mode": "block", "cache": "none"}, r"refresh_every applies to a windowed cache"),
        ({"refresh_every": 0, "mode": "block"}, r"refresh_every must be an int >= 1, got 0"),
        ({"cuda_graphs": "yes"}, r"cuda_graphs must be a bool, got 'yes'"),
        ({"mode": "block", "answer_len": 32, "block_len": 8, "steps": 3},
         r"steps=3 is too few for the answer: its 4 windows of 8 tokens need at least one step each"),
        ({"mode": "block", "answer_len": 32, "block_len": 8, "steps": 6, "tokens_per_step": 4},
         r"the answer \(32 tokens\) needs 8 steps but gets 6"),
        ({"attention": "causal"}, r"attention must be one of"),
        ({"temperature": -1.0}, r"temperature must be >= 0"),
        ({"factor": 0.0}, r"factor must be > 0"),
        ({"summary_min_tokens": 99}, r"summary_min_tokens must lie in \[0, summary_len=64\]"),
        ({"policy": "threshold", "tokens_per_step": 2}, r"tokens_per_step applies to the top-k policies"),
        ({"block_len": 32, "summary_len": 32, "steps": 10, "tokens_per_step": 2},
         r"steps=10 cannot commit the canvas at tokens_per_step=2: the think blocks \(32 tokens\) needs 16 steps but gets 5"),
        ({"steps": 1}, r"steps must be >= 2 when the summary decodes after the think blocks"),
        ({"temperatur": 0.5}, r"unknown generation settings \['temperatur'\]"),
    ],
)
def test_bad_config(model, overrides, message):
    with pytest.raises(ConfigError, match=message):
        paradec.generate(model, "a b", **overrides)


def test_empty_prompts(model):
    with pytest.raises(InputError, match="a prompt is empty"):
        paradec.generate(model, "   ")
    with pytest.raises(InputError, match="prompts is empty"):
        paradec.generate(model, [])
    with pytest.raises(InputError, match="a prompt is empty"):
        paradec.generate(model, ["a", []])
    for attention in ("isolated", "canvas"):  # chat messages that encode to no tokens
        with pytest.raises(InputError, match="a prompt encodes to no tokens"):
            paradec.generate(model, [{"role": "user", "content": " "}], attention=attention)


def test_canvas_longer_than_the_model(model):
    """Refused naming what sets the canvas in that mode (a Fast-dLLM or LLaDA caller's gen_length
    is paradec's max_new_tokens)."""
    with pytest.raises(ConfigError, match=r"exceeds the model's maximum length 256; lower blocks, block_len or "
                                          r"summary_len \(max_new_tokens\) or shorten the prompt"):
        paradec.generate(model, "a b", blocks=4, block_len=60, summary_len=30)
    for mode in ("block", "ao"):
        with pytest.raises(ConfigError, match=r"exceeds the model's maximum length 256; lower max_new_tokens "
                                              r"\(answer_len; gen_length in paradec.compat"):
            paradec.generate(model, "a b", mode=mode, max_new_tokens=300)


def test_mask_id_and_structure_tokens_in_user_ids(model):
    vocab = model.tokenizer.get_vocab()
    with pytest.raises(InputError, match=r"mask id or a canvas structure token \[1\]"):
        paradec.generate(model, [5, 6, vocab["<|mask|>"]])
    with pytest.raises(InputError, match="canvas structure token"):
        paradec.generate(model, [5, vocab["<summary>"]], blocks=2, block_len=4, summary_len=2)
    with pytest.raises(InputError, match=r"must lie in \[0, 96\)"):
        paradec.generate(model, [5, 500])


def test_canvas_attention_with_blocks_spread_is_refused(model):
    config = GenerationConfig(attention="canvas", blocks=3, block_len=4, summary_len=2)
    layout = build_layout(model, config)
    prompt = encode_prompt(model, "a b", config, layout)
    with pytest.raises(ConfigError, match="attention='canvas' needs every think block on one device"):
        Runner(model, config, layout, [prompt], think_blocks=[0])
    with pytest.raises(ConfigError, match=r"think_blocks must be a subset of range\(3\)"):
        Runner(model, config.__class__(blocks=3, block_len=4, summary_len=2), layout, [prompt], think_blocks=[3])
