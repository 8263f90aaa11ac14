"""Code that runs inside the processes the distributed tests launch (gloo on CPU)."""

from __future__ import annotations

import json
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, target, args: tuple, timeout_s: float = 120.0, device: str = "cpu") -> list[int]:
    """Runs ``target(rank, world_size, *args)`` in ``world_size`` processes wired as a torchrun
    job would be (gloo on the CPU, NCCL with ``device="cuda"``: one GPU per rank); returns their
    exit codes (None if one had to be killed)."""
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(rank, world_size, port, target, args, device)) for rank in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def _entry(rank, world_size, port, target, args, device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    from paradec.distributed import init_distributed, teardown

    init_distributed(device=device, timeout_s=60)
    try:
        target(rank, world_size, *args)
    finally:
        teardown()


def run_scenarios(rank, world_size, model_dir, scenarios, out_dir):
    """Each scenario: {"prompts": [...], "config": {...}}; rank 0 writes the results."""
    import paradec

    model = paradec.load(model_dir)
    results = []
    for scenario in scenarios:
        out = paradec.generate(model, scenario["prompts"], **scenario["config"])
        if out is not None:
            results.append([{"token_ids": r.token_ids, "trace": r.trace, "nfe": r.nfe, "steps": r.steps,
                             "placement": r.placement, "rank_timings": r.rank_timings, "timings": r.timings} for r in out])
        else:
            results.append(None)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)


def run_counting_captures(rank, world_size, model_dir, requests, config, out_dir):
    """Greedy requests on CUDA (fp32), one after another; each rank writes how many graph sets
    it captured, rank 0 also the tokens."""
    import torch

    import paradec
    from paradec.decoding import runner

    captures = []
    original = runner.PhaseSteps.__init__

    def counting(self, *args, **kwargs):
        captures.append(True)
        original(self, *args, **kwargs)

    runner.PhaseSteps.__init__ = counting
    model = paradec.load(model_dir, device="cuda", dtype=torch.float32)
    outs = [paradec.generate(model, prompts, **config) for prompts in requests]
    tokens = None if outs[0] is None else [[(r.token_ids, r.trace) for r in out] for out in outs]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"captures": len(captures), "tokens": tokens}, f)


def run_expecting_errors(rank, world_size, model_dir, scenarios, out_dir):
    """Each scenario is expected to fail; every rank writes the error it got."""
    import paradec

    model = paradec.load(model_dir)
    errors = []
    for scenario in scenarios:
        prompts = scenario.get(f"prompts_rank{rank}", scenario["prompts"])
        try:
            paradec.generate(model, prompts, **scenario["config"])
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - recorded for the test to read
            errors.append(f"{type(error).__name__}: {error}")
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)


def run_with_fault(rank, world_size, model_dir, config, fault_rank, fault, out_dir):
    """``fault_rank`` dies (``kill``) or raises (``raise``) before its second think step (where
the runner asks the guard whether to go on)."""
    import time

    import paradec
    from paradec.distributed.guard import Guard

    model = paradec.load(model_dir)
    if rank == fault_rank:
        original, checks = Guard.check, []

        def faulty(self):
            checks.append(True)
            if len(checks) == 2:
                if fault == "kill":
                    os._exit(9)
                raise ValueError("planted failure")
            return original(self)

        Guard.check = faulty
    start = time.monotonic()
    try:
        paradec.generate(model, "a b c", **config)
        message = None
    except Exception as error:  # noqa: BLE001
        message = f"{type(error).__name__}: {error}"
        traceback.print_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"error": message, "seconds": time.monotonic() - start}, f)


def run_with_answerer(rank, world_size, model_dir, answerer_dir, prompts, config, out_dir):
    """NAR→AR under torchrun: rank 0 writes the blocks and what the answerer wrote."""
    import paradec
    from paradec.models.ar import ARModel

    model = paradec.load(model_dir)
    answerer = ARModel.load(answerer_dir)
    out = paradec.generate(model, prompts, answerer=answerer, answer_tokens=6, **config)
    written = None if out is None else [{"token_ids": r.token_ids, "summary": r.summary,
                                         "answer_ids": r.answerer.token_ids} for r in out]
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(written, f)


def run_eval_cli(rank, world_size, argv):
    """``paradec eval`` with ``argv`` on every rank (rank 0 writes the results file)."""
    from paradec.cli import main

    code = main(argv)
    if code != 0:
        raise SystemExit(code)
