"""The unmasking policies: which masked positions a step commits (DESIGN.md contract 5: the
runner owns everything else — budgets, EOS, the canvas).

A policy is one ``Policy`` object in one module of this package, found by name: config
validation lists the names, the step body asks the policy for its ranking and commit rule, and
the commit kernel (``paradec.ops.select_commit``) applies the rule. Adding a policy is adding a
module that calls ``register``; ``modules()`` imports every module here once.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from paradec.ops.scoring import Scores
from paradec.ops.selection import TOPK

CHECK_EVERY = 4  # graph replays between completion checks when a rule decides how much commits


@dataclass
class Candidates:
    """What a policy ranks: the positions one step may commit, flattened over the batch, [N] each.

    key: one id per (request, group); position: absolute position (ties go to the lowest);
    scores: the model's scores of each position (``paradec.ops.scoring.Scores``); quota: the
    scheduled count of the candidate's group this step (top-k policies commit exactly that);
    floor: the least the group must commit this step (rule policies: at least the top-1, more
    when a step budget must be met); priority: a uniform number per position from the request's
    ``ORDER`` stream (policies with ``draws_order`` only).
    """

    key: torch.Tensor
    position: torch.Tensor
    scores: Scores
    quota: torch.Tensor
    floor: torch.Tensor
    priority: torch.Tensor | None = None


@dataclass(frozen=True)
class Policy:
    """name: what ``policy=`` (or, for an ``order``, ``mode=``) says. rule: the commit kernel's
    rule (``paradec.ops`` TOPK: exactly the group's quota, best first; THRESHOLD / FACTOR: every
    position that passes the rule's bound, at least the group's floor). rank: [N] ranking score
    of the candidates, higher first (ties go to the lower position). parameter: the config field
    holding the rule's bound (None: no bound). check_every: graph replays between the host's
    completion checks (None: a top-k schedule says exactly how many steps are left). order: a
    mode's fixed order (``ar_order``, ``random``), not selectable as ``policy=``. by_score: ranks
    by a model score, so ``rank_temperature`` may turn its best-first into a draw. draws_order:
    the ranking reads ``Candidates.priority`` (a per-position uniform from the ``ORDER`` stream).
    help: one line for the CLI and the docs."""

    name: str
    rule: int
    rank: Callable[[Candidates], torch.Tensor]
    help: str
    parameter: str | None = None
    check_every: int | None = None
    order: bool = False
    by_score: bool = False
    draws_order: bool = False


_REGISTRY: dict[str, Policy] = {}


def register(policy: Policy) -> Policy:
    if policy.name in _REGISTRY:
        raise ValueError(f"policy {policy.name!r} is registered twice")
    _REGISTRY[policy.name] = policy
    return policy


def _load() -> dict[str, Policy]:
    if not _REGISTRY:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
    return _REGISTRY


def get(name: str) -> Policy:
    """The policy (or mode order) called ``name``; KeyError names the known ones."""
    policies = _load()
    if name not in policies:
        raise KeyError(f"no policy {name!r}; known: {sorted(policies)}")
    return policies[name]


def names(*, order: bool = False, by_score: bool | None = None, rule: bool | None = None) -> tuple[str, ...]:
    """Registered names, sorted: the selectable policies (``order=False``) or the mode orders;
    ``by_score`` / ``rule`` filter on ranking by a score / committing by a bound."""
    return tuple(sorted(
        p.name for p in _load().values()
        if p.order == order and (by_score is None or p.by_score == by_score)
        and (rule is None or (p.rule != TOPK) == rule)
    ))


def of(config) -> Policy:
    """The policy a config decodes with: its mode's order where the mode fixes one, else its
    ``policy``."""
    orders = names(order=True)
    return get(config.mode if config.mode in orders else config.policy)
