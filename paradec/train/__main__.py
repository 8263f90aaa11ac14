"""python -m paradec.train {data, fit, export, answerer}: build the task data, train (one process
or torchrun), export a checkpoint for shipping, train the tiny AR answerer (or SeqDep scorer)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m paradec.train", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="the synthetic task's tokenizer and datasets (nap and longcot)")
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--problems", type=int, default=200_000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--noise", type=float, default=0.15, help="chance that a path makes one arithmetic slip")

    f = sub.add_parser("fit", help="train a model (run under torchrun for DDP)")
    f.add_argument("--data", required=True)
    f.add_argument("--tokenizer", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--model-config", type=Path, help="a config.json (LLaDA or Dream format); default: paradec-tiny's shape")
    f.add_argument("--init-from", help="fine-tune this checkpoint (a directory or a built-in name) instead of "
                   "training from random weights; its config.json is the model's")
    f.add_argument("--layers", type=int, default=6)
    f.add_argument("--width", type=int, default=256)
    f.add_argument("--heads", type=int, default=8)
    f.add_argument("--mlp", type=int, default=768)
    f.add_argument("--steps", type=int, default=1000)
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--warmup", type=int, help="warm-up steps (default: min(100, steps))")
    f.add_argument("--min-lr", type=float, default=0.1, help="the final learning rate as a fraction of --lr")
    f.add_argument("--weight-decay", type=float, default=0.1)
    f.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this")
    f.add_argument("--attention", default="isolated", choices=["isolated", "canvas"])
    f.add_argument("--no-structure-aware", action="store_true", help="let headers be masked too")
    f.add_argument("--no-bf16", action="store_true")
    f.add_argument("--compile", action="store_true")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--save-every", type=int, default=500)
    f.add_argument("--log-every", type=int, default=10)
    f.add_argument("--max-minutes", type=float)
    f.add_argument("--resume", action="store_true")

    e = sub.add_parser("export", help="copy a checkpoint for shipping (weights in --dtype, no trainer state)")
    e.add_argument("source", type=Path)
    e.add_argument("dest", type=Path)
    e.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    a = sub.add_parser("answerer", help="train the tiny AR answerer for NAR→AR (or the SeqDep scorer) on the synthetic task")
    a.add_argument("--objective", default="answerer", choices=["answerer", "scorer"])
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=3000)
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--lr", type=float, default=1e-3)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a.add_argument("--max-minutes", type=float)
    args = p.parse_args(argv)

    if args.command == "data":
        from paradec.train.recipe import build_task_data

        summary = build_task_data(args.out, args.problems, args.seed, args.noise)
        print(json.dumps({k: {"kept": v["kept"], "rejected": v["counts"]} for k, v in summary.items()}))
    elif args.command == "fit":
        from paradec.models.loading import load_tokenizer
        from paradec.train.recipe import tiny_model_config
        from paradec.train.trainer import TrainConfig, train

        if args.init_from:
            model = {}
        elif args.model_config:
            if not args.model_config.is_file():
                raise SystemExit(f"--model-config: {args.model_config} is not a file")
            model = json.loads(args.model_config.read_text())
        else:
            model = tiny_model_config(load_tokenizer(Path(args.tokenizer)), args.layers, args.width, args.heads, args.mlp)
        config = TrainConfig(
            data=args.data, tokenizer=args.tokenizer, out=args.out, model=model, steps=args.steps,
            batch_size=args.batch_size, lr=args.lr,
            warmup=min(100, args.steps) if args.warmup is None else args.warmup, min_lr=args.min_lr,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, attention=args.attention, structure_aware=not args.no_structure_aware,
            bf16=not args.no_bf16, compile=args.compile, seed=args.seed, save_every=args.save_every,
            log_every=args.log_every, max_minutes=args.max_minutes, resume=args.resume, init_from=args.init_from,
        )
        train(config)
    elif args.command == "answerer":
        from paradec.train.answerer import AnswererConfig, train as train_answerer

        train_answerer(AnswererConfig(out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed, device=args.device, max_minutes=args.max_minutes,
                                      objective=args.objective))
    else:
        from paradec.models.loading import load, resolve
        from paradec.models.saving import save_checkpoint

        model = load(args.source, dtype=torch.float32)
        config = json.loads((resolve(args.source) / "config.json").read_text())
        save_checkpoint(model.module, config, args.dest, model.tokenizer, dtype=DTYPES[args.dtype])
        print(f"exported {args.source} -> {args.dest} ({args.dtype})")


if __name__ == "__main__":
    main()
