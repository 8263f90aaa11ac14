"""The config's three parts (per-request parameters, runtime settings, distributed settings), the
flat GenerationConfig made of them, and ``validate``, the one entry point of every check."""

from __future__ import annotations

import dataclasses
import pickle

import pytest

from paradec.canvas import canvas_layout
from paradec.config import (DistributedSettings, GenerationConfig, RequestParams, RuntimeSettings, settings_help,
                            validate)
from paradec.errors import ConfigError

PARTS = (RequestParams, RuntimeSettings, DistributedSettings)


def _layout(config: GenerationConfig):
    headers = [[90 + i] for i in range(config.blocks)] + [[99]] if config.canvas else None
    return canvas_layout(config, mask_id=100, headers=headers)


def test_the_flat_config_is_its_three_parts_in_order():
    names = [f.name for f in dataclasses.fields(GenerationConfig)]
    assert names == [f.name for part in PARTS for f in dataclasses.fields(part)]
    for part in PARTS:
        for f in dataclasses.fields(part):
            assert f.metadata["help"], f.name  # the CLI and generate()'s docstring read it


def test_a_config_splits_into_its_parts():
    config = GenerationConfig(blocks=2, temperature=0.5, seed=3, window=8, cache="prefix", gather="kv")
    assert config.request == RequestParams(blocks=2, temperature=0.5, seed=3)
    assert config.runtime == RuntimeSettings(window=8, cache="prefix")
    assert config.distributed == DistributedSettings(gather="kv")
    assert config.request is config.request  # made once
    assert hash(config.request) == hash(RequestParams(blocks=2, temperature=0.5, seed=3))
    other_process = dataclasses.replace(config, rank_timeout_s=5.0, cuda_graphs=False)
    assert other_process.request == config.request and other_process.runtime != config.runtime


def test_the_flat_config_keeps_working_as_before():
    config = GenerationConfig.build(None, threshold=0.5, max_new_tokens=16)
    assert (config.policy, config.summary_len, config.max_new_tokens) == ("threshold", 16, 16)
    assert dataclasses.replace(config, temperature=0.7).temperature == 0.7
    assert dataclasses.asdict(config)["threshold"] == 0.5
    assert pickle.loads(pickle.dumps(config)) == config
    assert GenerationConfig.temperature == 0.0  # defaults read off the class
    with pytest.raises(ConfigError, match="temperature must be >= 0"):
        dataclasses.replace(config, temperature=-1.0)


@pytest.mark.parametrize("part, settings, message", [
    (RequestParams, dict(mode="chain"), r"mode must be one of"),
    (RequestParams, dict(top_k=5), r"top_k=5 restricts sampling: it needs temperature > 0"),
    (RequestParams, dict(mode="block", answer_len=16, block_len=4, steps=3), r"too few for the answer"),
    (RuntimeSettings, dict(window=0), r"window must be an int >= 1, got 0"),
    (RuntimeSettings, dict(cache="full"), r"cache must be one of \['none', 'prefix', 'dual'\]"),
    (RuntimeSettings, dict(cuda_graphs=1), r"cuda_graphs must be a bool, got 1"),
    (DistributedSettings, dict(rank_timeout_s=0), r"rank_timeout_s must be > 0, got 0"),
    (DistributedSettings, dict(gather="all"), r"gather must be one of \['tokens', 'kv'\]"),
])
def test_each_part_refuses_its_own_bad_values(part, settings, message):
    with pytest.raises(ConfigError, match=message):
        part(**settings)
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**settings)


def test_a_part_normalises_as_the_flat_config_does():
    params = RequestParams(mode="ao", max_new_tokens=12, stop="###", top_k=0)
    assert (params.answer_len, params.stop, params.top_k) == (12, ("###",), None)
    assert GenerationConfig(mode="ao", max_new_tokens=12, stop="###", top_k=0).request == params


@pytest.mark.parametrize("settings, message", [
    (dict(mode="ao", window=4), r"window applies to mode='nap' only"),
    (dict(summary="concurrent", window=4), r"window needs summary='after'"),
    (dict(cache="dual"), r"cache='dual' applies to windowed decoding"),
    (dict(window=8, refresh_every=2, cache="none"), r"refresh_every applies to a windowed cache"),
    (dict(window=8, cache="prefix", partial_refresh=True), r"partial_refresh applies to the dual cache"),
    (dict(partial_refresh=True), r"partial_refresh applies to the dual cache .* got cache=None"),
    (dict(block_len=16, window=4, steps=4), r"steps=4 is too few for the think blocks: its 4 windows"),
])
def test_checks_across_parts_run_when_the_config_is_made(settings, message):
    with pytest.raises(ConfigError, match=message):
        GenerationConfig(**settings)


def test_validate_checks_a_runners_groups():
    config = GenerationConfig(blocks=3, block_len=4, summary_len=2)
    layout = _layout(config)
    validate(config, layout=layout, think_blocks=[0, 2], summary=False)
    with pytest.raises(ConfigError, match=r"think_blocks must be a subset of range\(3\), got \[3\]"):
        validate(config, layout=layout, think_blocks=[3])
    canvas = dataclasses.replace(config, attention="canvas")
    validate(canvas, layout=layout)  # every block in one runner
    with pytest.raises(ConfigError, match="attention='canvas' needs every think block on one device"):
        validate(canvas, layout=layout, think_blocks=[0])
    with pytest.raises(ConfigError, match="attention='canvas' needs every think block on one device"):
        validate(canvas, layout=layout, think_blocks=[], summary=True)
    with pytest.raises(TypeError, match="need the layout"):
        validate(config, think_blocks=[0])


def test_validate_checks_fastdllm_windows():
    block = GenerationConfig(mode="block", answer_len=8, block_len=4, attention="canvas", cache="dual")
    validate(block, window_steps=2)
    with pytest.raises(ConfigError, match="FastDLLMRules.window_steps bounds a windowed cache's windows"):
        validate(dataclasses.replace(block, cache="none"), window_steps=2)


@pytest.mark.parametrize("settings, message", [
    (dict(attention="canvas"), r"attention='canvas' cannot be spread over 2 ranks"),
    (dict(mode="ao"), r"mode='ao' has no think blocks to spread"),
    (dict(summary="concurrent"), r"summary='concurrent' attends to every think block"),
])
def test_validate_checks_a_spread_over_ranks(settings, message):
    config = GenerationConfig(**settings)
    validate(config, ranks=1)
    with pytest.raises(ConfigError, match=message):
        validate(config, ranks=2)


def test_validate_checks_an_answerer_and_the_models_length():
    with pytest.raises(ConfigError, match="an answerer reads think blocks: it needs mode='nap', got mode='ao'"):
        validate(GenerationConfig(mode="ao"), answerer=True)
    everywhere = GenerationConfig(results_on="all")
    validate(everywhere, answerer=True)
    with pytest.raises(ConfigError, match="an answerer runs on rank 0 where the results are"):
        validate(everywhere, answerer=True, ranks=2)
    config = GenerationConfig(blocks=2, block_len=4, summary_len=2)
    layout = _layout(config)
    validate(config, layout=layout, prompt_tokens=10, max_length=10 + layout.length)
    with pytest.raises(ConfigError, match=rf"prompt \(11 tokens\) \+ canvas \({layout.length} tokens\) exceeds"):
        validate(config, layout=layout, prompt_tokens=11, max_length=10 + layout.length)


def test_settings_help_lists_every_setting_under_its_part():
    text = settings_help()
    headings = [line for line in text.splitlines() if not line.startswith("    ")]
    assert [h.split("(")[-1].rstrip("):") for h in headings] == [
        "paradec.config.RequestParams", "paradec.config.RuntimeSettings", "paradec.config.DistributedSettings"]
    for name in GenerationConfig.__dataclass_fields__:
        assert f"    {name} (" in text



@pytest.mark.parametrize("settings, partial", [
    (dict(window=4), True),  # nap windows: the dual cache, refreshed partially
    (dict(window=4, cache="dual", partial_refresh=None), True),
    (dict(window=4, refresh_every=2), False),  # a periodic refresh is a full one
    (dict(window=4, cache="prefix"), False),
    (dict(window=4, cache="none"), False),
    (dict(window=4, partial_refresh=False), False),
    (dict(), False),  # whole blocks: nothing cached, nothing refreshed
    (dict(mode="block", answer_len=16, block_len=4), False),  # Fast-dLLM's baseline keeps its refresh
    (dict(mode="block", answer_len=16, block_len=4, partial_refresh=True), True),
    (dict(window=4, refresh_every=2, partial_refresh=True), True),
])
def test_partial_refresh_defaults_to_on_for_nap_windows(settings, partial):
    config = GenerationConfig(**settings)
    assert config.refreshes_partially is partial
    assert GenerationConfig.build(config, blocks=3).refreshes_partially is partial  # survives overrides


def test_the_default_refresh_combines_with_fastdllm_rules():
    """Left unset, partial_refresh does not clash with Fast-dLLM's rules (their step body refreshes
    in full: test_windows); only asking for it by name is refused."""
    validate(GenerationConfig(window=4), window_steps=2)


def test_partial_refresh_is_refused_with_fastdllm_rules():
    """Fast-dLLM's rules commit a window's refresh over a region of their own; a partial refresh
    forwards only two windows' columns, so the two are not combined."""
    with pytest.raises(ConfigError, match="partial_refresh does not combine with Fast-dLLM's rules"):
        validate(GenerationConfig(window=4, partial_refresh=True), window_steps=2)
