"""Code that runs inside the processes the rank-liveness tests launch (gloo on CPU), and the
launcher that times when each process ends. Also a torchrun script:

    torchrun --nproc-per-node 2 tests/liveness_worker.py SCENARIO MODEL_DIR CONFIG_JSON OUT_DIR
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_worker import _entry, free_port  # noqa: E402

SCENARIOS = ("sleep", "sigstop", "stop_in_collective", "idle")


def launch_timed(world_size: int, target, args: tuple, timeout_s: float = 60.0) -> tuple[list, list]:
    """Runs ``target(rank, world_size, *args)`` in ``world_size`` gloo processes wired as torchrun
    would wire them; returns their exit codes and the wall-clock times they ended (None for one
    still running after ``timeout_s``: it is killed, stopped or not)."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, target, args, "cpu"))
             for rank in range(world_size)]
    ended: list[float | None] = [None] * world_size
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while None in ended and time.monotonic() < deadline:
            for i, p in enumerate(procs):
                if ended[i] is None and p.exitcode is not None:
                    ended[i] = time.time()
            time.sleep(0.01)
    finally:
        for p in procs:  # no orphans: SIGKILL ends a stopped process too
            if p.is_alive():
                p.kill()
            p.join()
    return [p.exitcode if ended[i] is not None else None for i, p in enumerate(procs)], ended


def run_liveness(rank, world_size, model_dir, config, scenario, out_dir):
    """Plays ``scenario`` on this rank; rank 0 (and rank 1 where it survives) writes
    ``rank{r}.json``: the error it got, the wall-clock time it began waiting and failed."""
    os.environ.setdefault("TORCHELASTIC_ERROR_FILE", os.path.join(out_dir, f"error{rank}.json"))  # as torchrun does
    import torch.distributed as dist

    import paradec
    from paradec.decoding.step import PhaseSteps
    from paradec.distributed import canvas

    timeout = config["rank_timeout_s"]
    model = paradec.load(model_dir)
    dist.barrier()  # loading takes unequal times on a busy machine: start the first call together
    report = {"error": None}

    def write():
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)

    if rank == 1 and scenario == "sigstop":  # frozen at its second think step of the first call
        original, calls = PhaseSteps._run, []

        def frozen(self, *args):
            calls.append(True)
            if len(calls) == 2:
                _stop_here(out_dir, rank)
            return original(self, *args)

        PhaseSteps._run = frozen
    if rank == 1 and scenario == "stop_in_collective":  # frozen inside the gather, after the meeting
        gather = canvas._gather_tokens

        def frozen_gather(local, env):
            _stop_here(out_dir, rank)
            return gather(local, env)

        canvas._gather_tokens = frozen_gather

    try:
        report["first_started"] = time.time()
        paradec.generate(model, "a b c", **config)
        report["first_done"] = time.time()
        if scenario == "sleep" and rank == 1:
            write()
            time.sleep(120)  # blocked in user code while rank 0 waits for it
        if scenario == "idle":  # both idle longer than the timeout; rank 1 a bit longer still
            time.sleep(timeout + 1 + (timeout / 2 if rank == 1 else 0))
        if scenario in ("sleep", "idle"):
            report["second_started"] = time.time()
            paradec.generate(model, "a b c", **config)
            report["second_done"] = time.time()
    except Exception as error:  # noqa: BLE001 - recorded for the test to read
        report["error"] = f"{type(error).__name__}: {error}"
        report["failed"] = time.time()
        traceback.print_exc()
    write()
    if report["error"] and __name__ == "__main__":
        raise SystemExit(1)


def _stop_here(out_dir, rank) -> None:
    """Notes the time, then SIGSTOPs this process (its heartbeat thread stops with it)."""
    with open(os.path.join(out_dir, f"stopped{rank}.txt"), "w") as f:
        f.write(repr(time.time()))
    os.kill(os.getpid(), signal.SIGSTOP)


def main(argv: list[str]) -> None:
    """Under torchrun: the same scenario, with the process group torchrun describes."""
    scenario, model_dir, config, out_dir = argv[0], argv[1], json.loads(argv[2]), argv[3]
    from paradec.distributed import init_distributed, teardown

    env = init_distributed("cpu", timeout_s=60)
    try:
        run_liveness(env.rank, env.world_size, model_dir, config, scenario, out_dir)
    finally:
        teardown()


if __name__ == "__main__":
    main(sys.argv[1:])
