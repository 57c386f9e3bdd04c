#!/usr/bin/env bash
# Fine-tune a model's VAE decoder alone (release 16 of the default model), then measure its reconstructions.
#   scripts/finetune_decoder.sh INIT [RUNS_DIR]     (INIT: the model to start from, e.g. release 15)
# Why (MODEL_CARD.md, 2026-12-04): the shipped VAE's reconstructions passed the checker 96.2% of the time, every
# failure a small star, cross or diamond on a coloured background blurred into a blob. --decoder-only keeps the
# encoder, so the latents the UNet learnt stay valid and the result is the whole model again. Two stages (each
# skipped once its result exists, resumed when stopped): dec1 at a high LR without EMA (595 steps: what a 12-minute
# --time-budget gave on a 2-core Zen4), dec2 from it at a lower one with EMA (2,083 steps: 42 minutes there).
# Knobs (environment): DEC1_STEPS (595), DEC1_LR (5e-4), DEC2_STEPS (2083), DEC2_LR (3e-4), BATCH (32).
set -euo pipefail
INIT=${1:?usage: finetune_decoder.sh INIT [RUNS_DIR]}
RUNS=${2:-/work/runs/decoder}
DEC1_STEPS=${DEC1_STEPS:-595} DEC1_LR=${DEC1_LR:-5e-4} DEC2_STEPS=${DEC2_STEPS:-2083} DEC2_LR=${DEC2_LR:-3e-4}
BATCH=${BATCH:-32}

resume_flag() { compgen -G "$1/step-*" > /dev/null && echo --resume || true; }
# decoder NAME FROM ARGS...: one decoder-only run from FROM's model unless NAME's result exists
decoder() {
  local name=$1 from=$2
  shift 2
  local out="$RUNS/$name"
  if [ ! -f "$out/model.safetensors" ]; then
    sdengine train vae --init "$from" --decoder-only --data shapes --out "$out" $(resume_flag "$out") \
      --batch "$BATCH" --save-every 100 "$@"
  fi
  [ -f "$out/model.safetensors" ] && return 0
  echo "finetune_decoder.sh: $out stopped before its end; run again to resume" >&2
  exit 1
}
decoder dec1 "$INIT" --steps "$DEC1_STEPS" --lr "$DEC1_LR" --warmup 20 --seed 16 --ema 0
decoder dec2 "$RUNS/dec1/model.safetensors" --steps "$DEC2_STEPS" --lr "$DEC2_LR" --warmup 50 --seed 17 --ema 0.999
python3 - "$INIT" "$RUNS/dec2/model.safetensors" <<'PY'
import sys
import torch
from sdengine.evaluate import reconstruction_pass_rate
from sdengine.train.stages.vae import load_init
for path in sys.argv[1:]:
    with torch.no_grad():
        rate = reconstruction_pass_rate(load_init(path)[0].eval(), n=520)
    print(f"{path}: VAE reconstructions passing the checker {rate:.3f} (n=520)")
PY
