#!/usr/bin/env bash
# Fine-tune a model's UNet on one GPU within a fixed wall time, the latent cache's building included:
#   scripts/finetune_default_model_gpu.sh INIT RUN_DIR
# First CACHE scenes of the shapes stream (--seed SEED) are rendered by worker processes and encoded once (a
# one-step run that leaves RUN_DIR/cache/latents.safetensors), then the UNet trains on them for the minutes left
# of MINUTES, less RESERVE seconds for the final save, sample grid and export; its LR schedule is fitted to that
# time (--time-budget). The result is RUN_DIR/unet/model.safetensors (fp16, original single-file layout).
# Knobs (environment): MINUTES (9), RESERVE (45), CACHE (400000), BATCH (1024), LR (2e-4), WARMUP (200), SEED (6),
# WORKERS (14), DEVICE (cuda), COMPILE (1: --compile; on an H100 1.47x the images/s after ~80 s of compiling, which
# pays off from ~4 minutes of training on), TEXT (1: --train-text-encoder), EXTRA (more `train unet` arguments,
# e.g. "--snr-floor 0.1 --timestep-shift 3"), SDENGINE (how to run the CLI).
set -euo pipefail
INIT=${1:?usage: finetune_default_model_gpu.sh INIT RUN_DIR}
RUN=${2:?usage: finetune_default_model_gpu.sh INIT RUN_DIR}
SD=${SDENGINE:-sdengine}
MINUTES=${MINUTES:-9} RESERVE=${RESERVE:-45} CACHE=${CACHE:-400000} BATCH=${BATCH:-1024} LR=${LR:-2e-4}
WARMUP=${WARMUP:-200} SEED=${SEED:-6} WORKERS=${WORKERS:-14} DEVICE=${DEVICE:-cuda}
start=$SECONDS
say() { echo "[$(date +%T) +$((SECONDS - start))s] $*"; }
COMMON=(--init "$INIT" --data shapes --device "$DEVICE" --seed "$SEED" --batch "$BATCH" --cache-latents "$CACHE")

say "latent cache: $CACHE scenes, $WORKERS workers"
$SD train unet --out "$RUN/cache" "${COMMON[@]}" --workers "$WORKERS" --steps 1 --save-every 0
mkdir -p "$RUN/unet"
ln -f "$RUN/cache/latents.safetensors" "$RUN/unet/latents.safetensors"  # the same inputs: reused, not rebuilt

left=$(python3 -c "print(round(max(0.5, ($MINUTES * 60 - ($SECONDS - $start) - $RESERVE) / 60), 2))")
say "UNet: $left minutes, batch $BATCH, lr $LR"
$SD train unet --out "$RUN/unet" "${COMMON[@]}" --lr "$LR" --warmup "$WARMUP" --steps 10000000 \
  --time-budget "$left" --save-every 2000 --log-every 50 \
  $( [ "${COMPILE:-0}" = 1 ] && echo --compile ) $( [ "${TEXT:-0}" = 1 ] && echo --train-text-encoder ) \
  ${EXTRA:-}
say "done: $RUN/unet/model.safetensors"
