#!/usr/bin/env bash
# The shipped model's recipe on one GPU, fitted to a fixed wall time: the same stages and architectures as
# scripts/train_default_model.sh (the CPU recipe), with larger batches, data prepared by worker processes, and
# each stage's step count fitted to its time budget (--time-budget) so that its LR schedule ends in time.
#   scripts/train_default_model_gpu.sh RUNS_DIR
# A text encoder already in RUNS_DIR/text/text.safetensors (from the CPU recipe, say) is reused.
# Knobs (environment): VAE_MIN, UNET_MIN (minutes per stage), VAE_BATCH, UNET_BATCH, WORKERS, DEVICE, GATE=warn (go on to the UNet
# even if the VAE misses the 98% reconstruction gate; default: stop), SDENGINE (how to run the CLI),
# UNET_CACHE=N (train the UNet on N pre-encoded items, --cache-latents; built before the UNet's time budget starts;
# default 0: encode the endless stream on the fly).
set -euo pipefail
RUNS=${1:?usage: train_default_model_gpu.sh RUNS_DIR}
SD=${SDENGINE:-sdengine}
DEVICE=${DEVICE:-cuda}
WORKERS=${WORKERS:-12}
VAE_MIN=${VAE_MIN:-2.8}
UNET_MIN=${UNET_MIN:-4.5}
COMMON=(--data shapes --device "$DEVICE" --workers "$WORKERS" --quiet)
mkdir -p "$RUNS"
say() { echo "[$(date +%T)] $*"; }

if [ ! -f "$RUNS/text/text.safetensors" ]; then
  say "text encoder"
  $SD train text --out "$RUNS/text" "${COMMON[@]}" --steps 1500 --batch 128 --lr 3e-4 --save-every 500
fi

if [ ! -f "$RUNS/vae/vae.safetensors" ]; then
  say "VAE: $VAE_MIN minutes"
  $SD train vae --out "$RUNS/vae" "${COMMON[@]}" --steps 100000 --batch "${VAE_BATCH:-128}" --lr 4e-4 --time-budget "$VAE_MIN" \
    --save-every 2000
fi
say "VAE gate"
python3 - "$RUNS/vae/vae.safetensors" "$DEVICE" "${GATE:-stop}" <<'PY'
import sys, torch
from sdengine.evaluate import reconstruction_pass_rate
from sdengine.weights.parts import read_part
vae = read_part(sys.argv[1], "vae").module().to(sys.argv[2])
rate = reconstruction_pass_rate(vae, n=500)
print(f"VAE reconstruction pass rate: {rate:.3f} (n=500)")
if rate < 0.98 and sys.argv[3] != "warn":
    sys.exit("the VAE must reconstruct >= 98% of ShapesEval images before the UNet is trained")
PY

if [ ! -f "$RUNS/unet/model.safetensors" ]; then
  say "UNet: $UNET_MIN minutes"
  $SD train unet --out "$RUNS/unet" "${COMMON[@]}" --steps 200000 --batch "${UNET_BATCH:-256}" --lr 3e-4 --time-budget "$UNET_MIN" \
    --save-every 2000 --vae "$RUNS/vae/vae.safetensors" --text "$RUNS/text/text.safetensors" \
    $( [ "${UNET_CACHE:-0}" -gt 0 ] && echo --cache-latents "$UNET_CACHE" )
fi
say "done: $RUNS/unet/model.safetensors"
