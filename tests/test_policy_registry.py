"""The policy registry: a policy is one object in one module, which config validation, the step
body and the commit kernel dispatch through."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import paradec
from paradec.decoding import policies
from paradec.ops.selection import THRESHOLD, TOPK
from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=3)
    return paradec.load(root)


def test_every_module_registers_the_policy_named_after_it():
    folder = Path(policies.__file__).parent
    modules = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    assert set(policies.names()) | set(policies.names(order=True)) == modules
    for name in modules:
        assert policies.get(name).name == name
    assert policies.names(rule=True) == ("factor", "threshold")
    assert policies.names(by_score=True) == ("confidence", "entropy", "margin")
    assert policies.names(order=True) == ("ar_order", "random")
    with pytest.raises(KeyError, match=r"no policy 'nope'; known: \['ar_order', 'confidence'"):
        policies.get("nope")


def test_config_validation_lists_the_registry():
    with pytest.raises(paradec.ConfigError, match=r"policy must be one of \['confidence', 'entropy', 'factor', 'margin', "
                                                  r"'threshold'\], got 'nope'"):
        paradec.GenerationConfig(policy="nope")


@pytest.fixture
def rightmost():
    """A policy registered the way a module of paradec/decoding/policies/ registers one: the
    rightmost masked positions first, its group's quota a step."""
    policy = policies.register(policies.Policy(
        name="rightmost", rule=TOPK, rank=lambda candidates: candidates.position.float(), help="rightmost first"))
    yield policy
    policies._REGISTRY.pop("rightmost")


def test_a_registered_policy_decodes_through_generate(model, rightmost):
    """Registering is all a new policy takes: config validation accepts its name, the step body
    ranks by it, and the top-k kernel commits by that ranking (here: right to left, two a step)."""
    result = paradec.generate(model, "1 2 3", mode="ao", answer_len=8, tokens_per_step=2, policy="rightmost",
                              eos_closes_block=False)
    trace = result.trace
    assert trace == sorted(trace, reverse=True)  # right to left
    assert [trace.count(s) for s in sorted(set(trace))] == [2, 2, 2, 2]
    block = paradec.generate(model, "1 2 3", mode="block", answer_len=8, block_len=4, tokens_per_step=1,
                             policy="rightmost", eos_closes_block=False)
    assert block.trace == [3, 2, 1, 0, 7, 6, 5, 4]  # blocks left to right, each right to left


def test_a_rule_policy_reads_its_parameter_from_the_config(model):
    threshold = policies.get("threshold")
    assert threshold.rule == THRESHOLD and threshold.parameter == "threshold" and threshold.check_every
    low = paradec.generate(model, "1 2 3", mode="ao", answer_len=12, policy="threshold", threshold=1e-6,
                           eos_closes_block=False)
    high = paradec.generate(model, "1 2 3", mode="ao", answer_len=12, policy="threshold", threshold=1.0,
                            eos_closes_block=False)
    assert low.steps == 1  # every position passes a bound of 1e-6
    assert high.steps == 12  # none passes 1.0 on a random model: the top-1 a step
    assert torch.tensor(high.trace).unique().numel() == 12
