"""The engine owns a model's per-process state (kept runners, the lock that lends them, the guard,
the measured prompt-KV rates); on_step sees a read-only progress view, never the runner."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import paradec
from paradec import engine as engine_module
from paradec.api import build_layout, encode_prompt, resolve_config
from paradec.decoding import kept
from paradec.decoding.progress import Progress
from paradec.distributed.env import DistEnv

from tiny import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root, _, _ = tiny_checkpoint(tmp_path_factory.mktemp("llada"), "llada", seed=21)
    return paradec.load(root)


def _make(model, prompts, **settings):
    config = resolve_config(model, **settings)
    layout = build_layout(model, config)
    return config, layout, [encode_prompt(model, p, config, layout) for p in prompts]


def test_one_engine_per_model_object(model, tmp_path):
    engine = paradec.engine_for(model)
    assert paradec.engine_for(model) is engine and engine.model is model
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=22)
    other = paradec.load(root)
    assert paradec.engine_for(other) is not engine


def test_a_dropped_model_takes_its_engine_and_kept_runners_along(tmp_path, monkeypatch):
    monkeypatch.setattr(kept, "captures", lambda config, device: True)  # keep the runner, as on a GPU
    root, _, _ = tiny_checkpoint(tmp_path, "llada", seed=23)
    model = paradec.load(root)
    config, layout, ids = _make(model, ["a b"], blocks=2, block_len=4, summary_len=2)
    with paradec.engine_for(model).runner(config, layout, ids) as runner:
        pass
    assert paradec.engine_for(model).kept.by_role["blocks"][1] is runner
    gone = weakref.ref(paradec.engine_for(model))
    del model, runner
    gc.collect()
    assert gone() is None  # no table outside the model holds it (or the model)


def test_the_kept_runners_go_to_one_thread_at_a_time(model, monkeypatch):
    monkeypatch.setattr(kept, "captures", lambda config, device: True)
    engine = engine_module.Engine(model)
    config, layout, ids = _make(model, ["a b"], blocks=2, block_len=4, summary_len=2)
    seen = {}
    with engine.runner(config, layout, ids) as held:
        def other(name, wait):
            with engine.runner(config, layout, ids, wait=wait) as runner:
                seen[name] = runner

        elsewhere = threading.Thread(target=other, args=("busy", False))
        elsewhere.start()
        elsewhere.join()
        assert seen["busy"] is not held  # a runner of its own, not kept
        waiting = threading.Thread(target=other, args=("waited", True))
        waiting.start()
        waiting.join(0.2)
        assert waiting.is_alive()  # waits for the kept runners...
    waiting.join()
    assert seen["waited"] is held  # ...and gets the kept one
    assert [role for role in engine.kept.by_role] == ["blocks"]


def test_prompt_kv_rates_are_measured_once_per_engine(model, monkeypatch):
    from paradec.distributed import prompt_kv

    measured = []
    monkeypatch.setattr(prompt_kv, "measure", lambda m, env: measured.append(m) or prompt_kv.Rates(1e9, [(0.0, 0.0)]))
    env = DistEnv(0, 0, 2, torch.device("cpu"), "gloo")
    engine = engine_module.Engine(model)
    assert engine.prompt_kv_rates(env) is engine.prompt_kv_rates(env)
    assert measured == [model]
    engine_module.Engine(model).prompt_kv_rates(env)  # another engine measures its own
    assert len(measured) == 2


def test_each_engine_has_its_own_guard_and_teardown_closes_them(model, monkeypatch):
    opened = []

    class FakeGuard:
        def __init__(self, rank, world_size, timeout_s, name):
            self.name, self.timeout_s, self.closed = name, timeout_s, False
            opened.append(self)

        def close(self):
            self.closed = True

    monkeypatch.setattr(engine_module, "Guard", FakeGuard)
    env = DistEnv(0, 0, 2, torch.device("cpu"), "gloo")
    first, second = engine_module.Engine(model), engine_module.Engine(model)
    monkeypatch.setattr(engine_module, "_ENGINES", weakref.WeakSet([first, second]))
    guard = first.guard(env, 5.0)
    assert first.guard(env, 7.0) is guard and guard.timeout_s == 7.0
    assert second.guard(env, 5.0).name != guard.name  # their keys in the store stay apart
    from paradec.distributed import teardown

    teardown()  # no process group here: closes the guards only
    assert [g.closed for g in opened] == [True, True]
    assert first.guard(env, 5.0) is not guard  # a later distributed call opens a new one


def test_on_step_gets_a_read_only_progress_view(model):
    views = []

    def on_step(progress):
        assert isinstance(progress, Progress)
        progress.canvas.fill_(0)  # a copy: the decode does not see it
        progress.trace.fill_(-1)
        views.append((progress.step, progress.committed().clone()))

    settings = dict(blocks=2, block_len=4, summary_len=2, tokens_per_step=2)
    watched = paradec.generate(model, "a b c", on_step=on_step, **settings)
    alone = paradec.generate(model, "a b c", **settings)
    assert watched.token_ids == alone.token_ids and watched.trace == alone.trace
    assert [step for step, _ in views] == sorted({step for step, _ in views})
    assert views[0][1].shape == (1, 3) and int(views[0][1].sum()) == 0
    assert all(int(a.sum()) < int(b.sum()) for (_, a), (_, b) in zip(views, views[1:]))
    assert repr(Progress(None, 3)) == "Progress(step=3)"
