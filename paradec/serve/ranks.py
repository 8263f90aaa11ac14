"""An engine of several ranks (``paradec serve --nproc N``): this process is rank 0 and talks to
the frontend; it starts ranks 1..N-1 (gloo on CPU, NCCL on GPUs, wired as torchrun would wire
them). Each batch is broadcast to every rank and decoded with the think blocks spread over the
ranks (``paradec.generate`` under a process group); rank 0 sends the results.

Under several ranks progress is not reported between steps (the ranks do not stop to talk
mid-canvas): a streaming request gets its final result only, an abort takes effect when its
batch ends, and the engine's progress (what the frontend's stall watch sees) moves once per
batch: ``--stall-timeout-s`` must exceed the longest batch. A rank that dies fails the batch in
flight (``RankFailure``, after ``rank_timeout_s``) and ends the engine, which the frontend
reports as ENGINE_DEAD (and starts again). Each rank dies with rank 0 (``PR_SET_PDEATHSIG``) and
shares its process group, which the frontend kills as one; SIGTERM to rank 0 ends the ranks at
once (a stop does not wait for a batch). Without ``OMP_NUM_THREADS``, each rank takes its share
of the cores, as torchrun arranges (N ranks each on every core are many times slower on a CPU).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys

import torch.distributed as dist

import paradec
from paradec.config import GenerationConfig
from paradec.distributed import init_distributed, teardown
from paradec.errors import ParadecError
from paradec.serve.engine import EngineLoop
from paradec.serve.process import die_with_parent
from paradec.serve.protocol import Limits

IDLE_TIMEOUT_S = 7 * 24 * 3600.0  # ranks wait this long for the next batch (a server idles)


class RankZeroLoop(EngineLoop):
    def _generate(self, prompts: list, config: GenerationConfig, on_step):
        dist.broadcast_object_list([(prompts, config)], src=0)
        return paradec.generate(self.model, prompts, config)


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
