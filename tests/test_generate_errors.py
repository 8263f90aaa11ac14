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
        ({"policy": "greedy"}, r"policy must be one of \['confidence', 'margin', 'entropy', 'threshold', 'factor'\], got 'greedy'"),
        ({"mode": "block"}, r"mode must be one of \['nap', 'ao', 'ar_order', 'random'\], got 'block'"),
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


def test_canvas_longer_than_the_model(model):
    with pytest.raises(ConfigError, match=r"exceeds the model's maximum length 256"):
        paradec.generate(model, "a b", blocks=4, block_len=60, summary_len=30)


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
