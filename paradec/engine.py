"""The engine: what decoding one model keeps in this process between calls.

``paradec.generate(model, ...)`` decodes through ``engine_for(model)``, made on the model's first
use. An ``Engine`` owns the model's kept runners (``paradec.decoding.kept``: CUDA graphs captured
once per shape) and lends them to one thread at a time; under torchrun it also owns this rank's
failure detection (``paradec.distributed.guard.Guard``) and the measured prompt-KV rates
(``paradec.distributed.prompt_kv``) that ``prompt_kv="auto"`` chooses by. Two models in one
process have an engine each. This module keeps only a weak set of the engines (so that
``close_guards``, called by ``paradec.distributed.teardown``, reaches their guards) and a counter
that names the guards.

The engine lives on its model object (``model.engine``), not in a table here: its kept runners
hold the model, so a table keyed by models would keep every model (and its GPU memory) alive;
model and engine go together when the model is dropped.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from paradec.canvas import CanvasLayout
from paradec.config import GenerationConfig
from paradec.decoding.fastdllm_rules import FastDLLMRules
from paradec.decoding.kept import KeptRunners
from paradec.decoding.runner import Runner
from paradec.distributed import prompt_kv
from paradec.distributed.env import DistEnv
from paradec.distributed.guard import Guard
from paradec.models.loading import DiffusionModel

_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()  # this process's engines, for close_guards()
_GUARD_NAMES = itertools.count()  # guards in the order this process opened them: the same on every rank


class Engine:
    """One model's decoding state in this process: its kept runners, the lock that lends them,
    and under torchrun its guard and measured prompt-KV rates. Use ``engine_for(model)``."""

    def __init__(self, model: DiffusionModel):
        self.model = model
        self.kept = KeptRunners(model)
        # the kept runners go to one thread at a time; re-entrant: a rank holds its blocks' runner
        # while it takes the summary's
        self._lending = threading.RLock()
        self._prompt_kv_rates: dict[tuple[str, str], prompt_kv.Rates] = {}
        self._guard: Guard | None = None

    @contextmanager
    def runner(self, config: GenerationConfig, layout: CanvasLayout, prompts: list[list[int]],
               think_blocks: list[int] | None = None, summary: bool | None = None,
               fastdllm: FastDLLMRules | None = None, wait: bool = False) -> Iterator[Runner]:
        """A runner for these arguments (``Runner``'s) for the ``with`` block: the kept one
        (reset) when it fits, else a new one that may be kept. Another thread decoding with
        this engine holds the kept runners: then this one gets a runner of its own, or, with
        ``wait``, waits for them (ranks decode one canvas at a time)."""
        if not self._lending.acquire(blocking=wait):
            yield Runner(self.model, config, layout, prompts, think_blocks=think_blocks, summary=summary,
                         fastdllm=fastdllm)
            return
        try:
            yield self.kept.runner(config, layout, prompts, think_blocks=think_blocks, summary=summary,
                                   fastdllm=fastdllm)
        finally:
            self._lending.release()

    def release_kept(self) -> None:
        """Frees the kept runners (their graphs and caches) now, once no thread decodes with them."""
        with self._lending:
            self.kept.release()

    def guard(self, env: DistEnv, timeout_s: float) -> Guard:
        """This rank's failure detection for this engine's distributed decodes, opened on first
        use (every rank opens it in the same call, so the ranks' guards share their store keys)."""
        if self._guard is None:
            self._guard = Guard(env.rank, env.world_size, timeout_s, name=f"engine{next(_GUARD_NAMES)}")
            self._guard_closer = weakref.finalize(self, self._guard.close)  # an engine dropped stops beating
            self._guard_closer.atexit = False
        self._guard.timeout_s = timeout_s
        return self._guard

    def close_guard(self) -> None:
        """Stops this engine's failure detection (before the process group ends)."""
        if self._guard is not None:
            self._guard_closer.detach()
            self._guard.close()
            self._guard = None

    def prompt_kv_rates(self, env: DistEnv) -> prompt_kv.Rates:
        """The link and prefill rates ``prompt_kv="auto"`` predicts by, measured on every rank
        at once on first use (a collective) and kept."""
        key = (str(env.device), str(self.model.dtype))
        if key not in self._prompt_kv_rates:
            self._prompt_kv_rates[key] = prompt_kv.measure(self.model, env)
        return self._prompt_kv_rates[key]


def engine_for(model: DiffusionModel) -> Engine:
    """``model``'s engine in this process, made on first use."""
    engine = getattr(model, "engine", None)
    if engine is None or engine.model is not model:  # none yet, or one copied along with a copied model
        engine = Engine(model)
        model.engine = engine
        _ENGINES.add(engine)
    return engine


def close_guards() -> None:
    """Stops every engine's failure detection (``paradec.distributed.teardown``)."""
    for engine in list(_ENGINES):
        engine.close_guard()
