"""An engine of several ranks (``paradec serve --nproc N``): this process is rank 0 and talks to
the frontend; it starts ranks 1..N-1 (gloo on CPU, NCCL on GPUs, wired as torchrun would wire
them). Each batch is broadcast to every rank and decoded with the think blocks spread over the
ranks (``paradec.generate`` under a process group); rank 0 sends the results.

Scheduling here is batch by config, not the one-process engine's continuous batching (a
``BatchEngine`` decodes in one process on one device): requests wait in arrival order, and rank 0
decodes the oldest together with every waiting request it is *compatible* with, up to
``max_batch`` — the same settings (a batch decodes one config), greedy (``temperature`` 0, an
order other than ``random``, no ``rank_temperature``) and ``isolated`` attention, where batching
cannot change a request's tokens (sampled requests decode alone: request r of a batch draws from
``seed + r``). A batch runs start to finish; requests that arrive meanwhile wait for the next.
The messages (checks, limits, replies, liveness) are the one-process engine's
(``paradec.serve.engine.MessageLoop``).

Under several ranks progress is not reported between steps (the ranks do not stop to talk
mid-canvas): a streaming request gets its final result only, an abort or a deadline reaches a
request still waiting (one that is decoding gets its result when its batch ends; a deadline's
``timeout`` then comes from the frontend), and the engine's progress (what the frontend's stall
watch sees) moves once per batch: ``--stall-timeout-s`` must exceed the longest batch. A rank
that dies fails the batch in flight (``RankFailure``, after ``rank_timeout_s``) and ends the
engine, which the frontend reports as ENGINE_DEAD (and starts again). Each rank dies with rank 0
(``PR_SET_PDEATHSIG``) and shares its process group, which the frontend kills as one; SIGTERM to
rank 0 ends the ranks at once (a stop does not wait for a batch). Without ``OMP_NUM_THREADS``,
each rank takes its share of the cores, as torchrun arranges (N ranks each on every core are
many times slower on a CPU).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections import deque

import torch.distributed as dist
import zmq

import paradec
from paradec.api import build_layout
from paradec.config import RequestParams, RuntimeSettings, validate
from paradec.distributed import init_distributed, teardown
from paradec.distributed.guard import RankFailure
from paradec.errors import ParadecError
from paradec.serve.engine import MessageLoop, Request
from paradec.serve.process import die_with_parent
from paradec.serve.protocol import Limits

log = logging.getLogger(__name__)
IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # ranks wait this long for the next batch (a server idles)


def batchable(params: RequestParams) -> bool:
    """Whether a request with these parameters gets the same tokens in a batch as alone: greedy
    (sampled requests draw from ``seed + r``, r the batch position; so do ``random`` order's and
    ``rank_temperature``'s position draws) under ``isolated`` attention."""
    return (params.temperature == 0 and params.mode != "random" and params.attention == "isolated"
            and params.rank_temperature == 0)


def batches_with(first: Request, other: Request, row: int = 1) -> bool:
    """Whether ``other`` may join ``first``'s batch as its row ``row``: the same runtime settings
    (``partial_refresh`` as it resolves: unset decodes as its default) and the same request
    parameters, greedy ones whose tokens batching cannot change, or sampled ones under
    ``isolated`` attention whose seed is first's + ``row`` (``generate()`` draws row r from seed + r,
    so each decodes as alone: the n choices of an HTTP request, seeds s .. s + n - 1)."""
    if _runtime(other) != _runtime(first):
        return False
    mine, theirs = first.config.request, other.config.request
    if batchable(mine):
        return theirs == mine
    return (mine.attention == "isolated" and theirs.seed == mine.seed + row
            and dataclasses.replace(theirs, seed=mine.seed) == mine)


def _runtime(request: Request) -> RuntimeSettings:
    config = request.config
    return dataclasses.replace(config.runtime, partial_refresh=config.refreshes_partially)


class RankZeroLoop(MessageLoop):
    """Rank 0's loop: batches of compatible requests, each broadcast to the ranks and decoded
    start to finish, no messages read meanwhile (the ranks do not stop to talk mid-canvas)."""

    def __init__(self, model, requests_address: str, outputs_address: str, max_batch: int = 8,
                 limits: Limits = Limits(), context: zmq.Context | None = None):
        super().__init__(model, requests_address, outputs_address, max_batch, limits, context)
        self.waiting: deque[Request] = deque()

    def _queue(self, request: Request) -> None:
        """Refuses (``invalid``, before any ``accepted``) what the ranks cannot decode spread, as
        ``generate()`` under the process group would; queues the rest."""
        config = request.config
        validate(config, layout=build_layout(self.model, config), ranks=dist.get_world_size(),
                 prompt_tokens=len(request.prompt), max_length=self.model.spec.max_length,
                 shifted=self.model.spec.shift_logits)
        self.waiting.append(request)

    def _abort(self, request_id: str) -> None:
        for request in list(self.waiting):
            if request.id == request_id:
                self.waiting.remove(request)
                return self._error(request_id, "aborted", "aborted before it started")

    def _expire(self) -> None:
        now = time.monotonic()
        for request in [r for r in self.waiting if r.deadline is not None and now > r.deadline]:
            self.waiting.remove(request)
            self._error(request.id, "timeout", "timed out waiting for the engine")

    def _busy(self) -> bool:
        return bool(self.waiting)

    def _work(self) -> None:
        self._run(self._next_batch())

    def _next_batch(self) -> list[Request]:
        first = self.waiting.popleft()
        batch = [first]
        for request in list(self.waiting):
            if len(batch) == self.max_batch:
                break
            if batches_with(first, request, len(batch)):
                self.waiting.remove(request)
                batch.append(request)
        return batch

    def _run(self, batch: list[Request]) -> None:
        prompts, config = [r.prompt for r in batch], batch[0].config
        started = time.monotonic()
        try:
            dist.broadcast_object_list([(prompts, config)], src=0)
            results = paradec.generate(self.model, prompts, config)
        except RankFailure as e:  # a rank is gone: this engine cannot decode any more
            for r in batch:
                self._error(r.id, "failed", str(e))
            raise
        except Exception as e:  # noqa: BLE001 - one failed batch must not take the engine down
            log.exception("batch failed")
            for r in batch:
                self._error(r.id, "failed", f"{type(e).__name__}: {e}")
            return
        generate_s = time.monotonic() - started
        for r, result in zip(batch, results):
            self._final(r.id, result, {"queued": started - r.arrived, "generate": generate_s})


def _follow(rank: int, world_size: int, port: int, model_path: str, device: str | None, parent: int) -> None:
    die_with_parent(parent)
    _wire(rank, world_size, port)
    env = init_distributed(device, timeout_s=IDLE_TIMEOUT_S)
    try:
        model = paradec.load(model_path, device=env.device)
        while True:
            batch = [None]
            try:
                dist.broadcast_object_list(batch, src=0)
            except RuntimeError as e:  # rank 0 is gone (killed): nothing left to serve
                logging.getLogger(__name__).warning("rank %d: rank 0 went away (%s); exiting", rank,
                                                    str(e).splitlines()[0][:120])
                return
            if batch[0] is None:
                return
            prompts, config = batch[0]
            try:
                paradec.generate(model, prompts, config)
            except ParadecError:  # a config the ranks refuse alike (rank 0 reports it): wait for the next
                continue
    finally:
        teardown()


def _wire(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun does: ranks share the cores, not each take all of them
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // world_size))


def run_ranks(nproc: int, model_path: str, requests_address: str, outputs_address: str, max_batch: int = 8,
              device: str | None = None, limits: Limits = Limits()) -> None:
    logging.basicConfig(level=logging.INFO, format="engine rank 0 %(levelname)s %(message)s")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # plain subprocesses: the engine itself may be a daemon process, which multiprocessing forbids children
    followers = [subprocess.Popen([sys.executable, "-m", "paradec.serve.ranks", str(r), str(nproc), str(port),
                                   model_path, device or "", str(os.getpid())]) for r in range(1, nproc)]

    def stop(*_) -> None:  # the frontend stops the engine: the ranks go too, now (mid-batch or not)
        for p in followers:
            p.kill()
        for p in followers:
            p.wait()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    _wire(0, nproc, port)
    env = init_distributed(device, timeout_s=IDLE_TIMEOUT_S)
    try:
        model = paradec.load(model_path, device=env.device)
        RankZeroLoop(model, requests_address, outputs_address, max_batch, limits).serve_forever()
    finally:
        try:
            dist.broadcast_object_list([None], src=0)  # followers leave their loop
        except RuntimeError as e:  # they are gone already (failed to load the model as rank 0 did, or killed)
            log.warning("the other ranks are gone (%s)", str(e).splitlines()[0][:120])
        finally:
            teardown()
            for p in followers:
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


if __name__ == "__main__":  # a follower rank, started by run_ranks
    rank, world_size, port, model_path, device, parent = sys.argv[1:7]
    _follow(int(rank), int(world_size), int(port), model_path, device or None, int(parent))
