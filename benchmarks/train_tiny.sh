#!/usr/bin/env bash
# Trains paradec-tiny (NAP canvas) and paradec-tiny-longcot (the same paths serialised) on the
# synthetic task, side by side on one GPU, and exports both in bf16 into the package (with their
# loss logs and training configs); `python benchmarks/tiny_accuracy.py` then measures them on
# the held-out split. The recipe the built-in models' cards quote (on one H100: data 84 s,
# training 375 s).
#
#   bash benchmarks/train_tiny.sh WORKDIR   # env: PROBLEMS, STEPS, BATCH, LR, WARMUP, MINUTES, DEST, FIT_ARGS
set -euo pipefail
work=${1:?usage: train_tiny.sh WORKDIR}
problems=${PROBLEMS:-150000} steps=${STEPS:-3200} batch=${BATCH:-256} lr=${LR:-1.5e-3} minutes=${MINUTES:-7}
dest=${DEST:-paradec/models/builtin}
mkdir -p "$work"
[ -f "$work/data/longcot.safetensors" ] || python -m paradec.train data --out "$work/data" --problems "$problems"
pids=()
for kind in nap longcot; do
  python -m paradec.train fit --data "$work/data/$kind.safetensors" --tokenizer "$work/data/tokenizer" \
    --out "$work/$kind" --steps "$steps" --batch-size "$batch" --lr "$lr" --warmup "${WARMUP:-200}" --log-every 50 \
    --save-every 1000 --max-minutes "$minutes" ${FIT_ARGS:-} > "$work/$kind.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for kind in nap longcot; do  # a run cut short by MINUTES is not the recipe: refuse to ship it
  python -c "import sys, torch; s = torch.load(sys.argv[1], weights_only=True)['step']; sys.exit(0 if s == $steps else f'$kind stopped at step {s} of $steps (MINUTES ran out)')" "$work/$kind/trainer_state.pt"
done
python -m paradec.train export "$work/nap" "$dest/paradec-tiny" --dtype bf16
python -m paradec.train export "$work/longcot" "$dest/paradec-tiny-longcot" --dtype bf16
for kind in nap longcot; do
  name=paradec-tiny; [ "$kind" = longcot ] && name=paradec-tiny-longcot
  cp "$work/$kind/loss_log.jsonl" "$work/$kind/train_config.json" "$dest/$name/"
done
