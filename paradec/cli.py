"""The ``paradec`` command (also ``python -m paradec``; under torchrun ``torchrun ... -m paradec``).

    paradec decode --prompt "What is 3 + 4?"               # the main job; torchrun -m paradec decode spreads it
    paradec eval --model paradec-tiny --task synthetic --limit 50 --out runs/tiny.jsonl
    paradec eval --model PATH --task gsm8k --data ../shared/data/gsm8k/test.jsonl --blocks 4 --steps 256
    paradec seqdep --model paradec-tiny-answerer --data texts.jsonl --segment lines
    paradec lm-eval --model paradec --model_args pretrained=PATH --tasks paradec_gsm8k_local ...

Every ``GenerationConfig`` field is a flag of ``decode`` and ``eval`` (``--tokens-per-step``,
``--window``, ...); a flag left out takes the checkpoint's own default, then paradec's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from paradec import __version__
from paradec import config as C
from paradec.decoding import policies

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CHOICES = {"mode": C.MODES, "policy": policies.names(), "attention": C.ATTENTIONS, "schedule": C.SCHEDULES,
            "summary": C.SUMMARY_ORDERS, "prompt_kv": C.PROMPT_KV, "gather": C.GATHERS, "results_on": C.RESULTS_ON,
            "cache": C.CACHES}
_TYPES = {"int": int, "float": float, "str": str}


_GROUPS = (("generation settings, per request (GenerationConfig; a flag left out takes the checkpoint's own "
            "default, then paradec's)", C.RequestParams),
           ("generation settings, runtime", C.RuntimeSettings),
           ("generation settings, distributed (torchrun)", C.DistributedSettings))


def add_generation_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per GenerationConfig field, grouped by the config's parts; ``--name/--no-name``
    for booleans; default: unset (the checkpoint's own default, then paradec's)."""
    for title, part in _GROUPS:
        group = parser.add_argument_group(title)
        for f in dataclasses.fields(part):
            flag = "--" + f.name.replace("_", "-")
            base = str(f.type).replace(" | None", "")
            text = f"{f.metadata['help']} (paradec's default: {f.default})".replace("%", "%%")
            unset = {"dest": f"gen_{f.name}", "default": argparse.SUPPRESS, "help": text}  # absent unless given
            if base == "bool":
                group.add_argument(flag, action=argparse.BooleanOptionalAction, **unset)
            else:
                group.add_argument(flag, type=_TYPES[base], choices=_CHOICES.get(f.name),
                                   metavar=None if f.name in _CHOICES else base.upper(), **unset)


def generation_overrides(args: argparse.Namespace) -> dict:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("gen_")}


def _eval(args: argparse.Namespace) -> int:
    import paradec
    from paradec.api import resolve_config
    from paradec.distributed import init_distributed, print0, teardown
    from paradec.eval.run import evaluate
    from paradec.eval.tasks import get_task, load_examples

    task = get_task(args.task)
    loaded = load_examples(task, args.data, args.limit, args.skip_malformed)  # before any model is loaded
    env = init_distributed(args.device)
    try:
        model = paradec.load(args.model, device=env.device, dtype=DTYPES.get(args.dtype))
        config = resolve_config(model, **generation_overrides(args))
        answerer = None
        if args.answerer:
            from paradec.models.ar import ARModel

            answerer = ARModel.load(args.answerer, device=env.device)
        for number, why in loaded.skipped:
            print0(f"skipped line {number}: {why}")
        report = evaluate(model, task, loaded.examples, config, out=args.out, batch_size=args.batch_size,
                          resume=not args.no_resume, spread=args.spread, prompt_template=args.prompt_template,
                          answerer=answerer, answer_tokens=args.answer_tokens, model_name=str(args.model),
                          answerer_name=args.answerer, data=str(args.data) if args.data else None,
                          progress=not args.no_progress)
        if report is not None:
            report.skipped_lines = loaded.skipped
            _print_report(report, args.out)
    finally:
        teardown()
    return 0


def _print_report(report, out: Path | None) -> None:
    print(f"\ntask {report.task}: {report.n} examples ({report.resumed} read back from {out})" if report.resumed
          else f"\ntask {report.task}: {report.n} examples")
    rows = [("accuracy (strict)", f"{report.accuracy:.4f}"), ("accuracy (flexible)", f"{report.accuracy_flexible:.4f}"),
            ("no answer found", f"{len(report.unparsed)}"), ("NFE per example", f"{report.nfe:.1f}"),
            ("tokens per step", f"{report.tokens_per_step:.2f}"), ("answer tokens", f"{report.answer_tokens}"),
            ("generate seconds", f"{report.wall_s:.2f}"), ("answer tokens / s", f"{report.tokens_per_s:.1f}"),
            ("Global ARness@1", f"{report.global_arness:.3f}")]
    for name, value in rows:
        print(f"  {name:<22} {value:>10}")
    if report.unparsed:
        shown = ", ".join(map(str, report.unparsed[:20])) + (" ..." if len(report.unparsed) > 20 else "")
        print(f"  no answer in: {shown}")
    if out is not None:
        print(f"  per example: {out}")
    print(json.dumps({"eval": report.as_dict()}))


def _decode(args: argparse.Namespace) -> int:
    from paradec.decode import run

    return run(args)


def _seqdep(args: argparse.Namespace) -> int:
    from paradec.eval.seqdep import run_cli

    return run_cli(args)


def _serve(args: argparse.Namespace) -> int:
    from paradec.serve.server import serve

    return serve(args)


def _lm_eval(argv: list[str]) -> int:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("paradec lm-eval needs lm-evaluation-harness: pip install 'paradec[eval]'", file=sys.stderr)
        return 2
    import paradec.eval.harness  # noqa: F401  registers --model paradec

    if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        from paradec.eval.harness import TASKS_DIR

        argv = [*argv, "--include_path", str(TASKS_DIR)]  # paradec's own tasks (paradec_gsm8k_local)
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="paradec", description=__doc__.split("\n\n")[0])
    p.add_argument("--version", action="version", version=f"paradec {__version__} (torch {torch.__version__})")
    sub = p.add_subparsers(dest="command", required=True)
    defaults = argparse.ArgumentDefaultsHelpFormatter

    d = sub.add_parser("decode", formatter_class=defaults,
                       help="decode one canvas and print its blocks, summary, answer and timings (the main job)")
    from paradec.decode import add_flags as add_decode_flags

    add_decode_flags(d)

    e = sub.add_parser("eval", formatter_class=defaults,
                       help="accuracy, NFE, tokens/s and ARness of a model on a task")
    e.add_argument("--model", default="paradec-tiny", help="checkpoint directory or a built-in model's name")
    e.add_argument("--task", required=True, choices=["gsm8k", "math500", "synthetic"],
                   help="what the examples are and how answers are graded (paradec.eval.tasks)")
    e.add_argument("--data", type=Path, help="JSONL file (default: the split shipped with paradec: GSM8K's test "
                   "split, the synthetic task's held-out split; math500 needs one)")
    e.add_argument("--limit", type=int, help="the first N examples")
    e.add_argument("--out", type=Path, help="per-example JSONL; an existing one with the same settings is resumed")
    e.add_argument("--no-resume", action="store_true", help="overwrite --out instead of resuming it")
    e.add_argument("--skip-malformed", action="store_true", help="skip (and list) malformed data lines")
    e.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    e.add_argument("--spread", choices=["examples", "canvas"], default="examples",
                   help="under torchrun: give each rank its own examples, or spread each canvas over the ranks")
    e.add_argument("--prompt-template", default="{question}", help="the prompt; {question} is replaced")
    e.add_argument("--answerer", help="NAR→AR: a causal LM directory (or built-in name) that writes the answer")
    e.add_argument("--answer-tokens", type=int, default=64, help="with --answerer: its token budget")
    e.add_argument("--device", help="default: this rank's GPU, else the CPU")
    e.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_flags(e)

    s = sub.add_parser("seqdep", formatter_class=defaults, help="SeqDep (NAP Eq. 4) of texts under a causal LM")
    from paradec.eval.seqdep import add_flags

    add_flags(s)
    sub.add_parser("lm-eval", help="lm-evaluation-harness's CLI with --model paradec registered", add_help=False)

    v = sub.add_parser("serve", formatter_class=defaults, help="an engine behind a ZeroMQ frontend (and an OpenAI-compatible HTTP endpoint)")
    v.add_argument("--model", default="paradec-tiny", help="checkpoint directory or a built-in model's name")
    v.add_argument("--address", default="tcp://127.0.0.1:5555", help="where clients connect (ZeroMQ endpoint)")
    v.add_argument("--http-port", type=int, help="also serve OpenAI-compatible HTTP on this port")
    v.add_argument("--http-host", default="127.0.0.1", help="with --http-port: the address HTTP binds")
    v.add_argument("--served-model-name", help="with --http-port: the model id /v1/models lists (default: --model "
                   "as given, a checkpoint's path too)")
    v.add_argument("--token-file", help="a file holding the shared secret every client sends (or set PARADEC_TOKEN; "
                   "at least 16 characters; required to bind a non-loopback address)")
    v.add_argument("--token", help=argparse.SUPPRESS)  # refused by name: ps shows a command line to every user
    v.add_argument("--nproc", type=int, default=1, help="engine ranks (torchrun-style; rank 0 talks to the frontend)")
    v.add_argument("--max-pending", type=int, default=64, help="requests in flight before new ones get 'busy'")
    v.add_argument("--max-batch", type=int, default=8, help="requests decoded at once (rows of the KV pool)")
    v.add_argument("--kv-memory-fraction", type=float, default=0.8,
                   help="share of free GPU memory the KV pool may take (it holds at most --max-batch rows)")
    v.add_argument("--warm-up", type=json.loads, action="append", default=[], metavar="SETTINGS_JSON",
                   help="request settings whose CUDA graphs are captured before serving, e.g. "
                        "'{\"blocks\": 4, \"window\": 32}' (repeatable; the model's defaults always are)")
    v.add_argument("--device", help="default: the GPU, else the CPU")
    v.add_argument("--request-timeout-s", type=float, default=600.0, help="deadline of every HTTP request and of "
                   "a ZeroMQ request that sets no timeout_s, from its arrival (waiting included)")
    v.add_argument("--stall-timeout-s", type=float, default=60.0, help="with requests in flight, seconds without "
                   "engine progress before health turns false, they fail with 'stalled' and the engine restarts "
                   "(0: never; above the longest step, or batch with --nproc)")
    v.add_argument("--restart", action=argparse.BooleanOptionalAction, default=True,
                   help="start a new engine after one died or stalled")
    v.add_argument("--http-max-body-bytes", type=int, default=1 << 20, help="larger HTTP bodies get 413 unread")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:
        return _lm_eval(argv[1:])
    args = parser().parse_args(argv)
    from paradec.errors import ParadecError

    try:
        return {"decode": _decode, "eval": _eval, "seqdep": _seqdep, "serve": _serve}[args.command](args)
    except ParadecError as e:
        print(f"paradec {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
