#!/usr/bin/env bash
# Trains the model sdengine ships (sdengine/models/default/), stage by stage, on the procedural shapes world.
# Every stage resumes from its newest checkpoint when run again, so this script can be stopped and rerun.
#   scripts/train_default_model.sh [RUNS_DIR]        (default /work/runs; hours of CPU)
set -euo pipefail
RUNS=${1:-/work/runs}
# The only job on the machine: OpenMP threads may spin (OMP_WAIT_POLICY=PASSIVE halves the speed when idle).
mkdir -p "$RUNS"

stage() {  # stage NAME RESULT ARGS...: train unless RESULT exists (written only when a stage completes);
  local name=$1 result=$2; shift 2  # resume when the run folder has checkpoints (a stop saves one)
  local out="$RUNS/$name"
  local resume=()
  if [ -f "$out/$result" ]; then return; fi
  if compgen -G "$out/step-*" > /dev/null; then resume=(--resume); fi
  sdengine train "$name" --data shapes --out "$out" "${resume[@]}" "$@"
  [ -f "$out/$result" ] || { echo "stage $name stopped before the end; run this script again to resume"; exit 1; }
}

stage vae vae.safetensors --steps 4000 --batch 32 --lr 3e-4 --save-every 200 --sample-every 500
python - "$RUNS/vae/vae.safetensors" <<'PY'
import sys
from sdengine.evaluate import reconstruction_pass_rate
from sdengine.weights.parts import read_part
rate = reconstruction_pass_rate(read_part(sys.argv[1], "vae").module(), n=500)
print(f"VAE reconstruction pass rate: {rate:.3f}")
if rate < 0.98:
    sys.exit("the VAE must reconstruct >= 98% of ShapesEval images before the UNet is trained")
PY
stage text text.safetensors --steps 1500 --batch 128 --lr 3e-4 --save-every 250
# On 200k pre-encoded items (~35 min to build on 2 cores, 0.8 GB; then 1.4x the images/s of encoding every step).
stage unet model.safetensors --steps 40000 --batch 32 --lr 2e-4 --save-every 500 --sample-every 2000 \
  --vae "$RUNS/vae/vae.safetensors" --text "$RUNS/text/text.safetensors" --cache-latents 200000
sdengine eval --model "$RUNS/unet/model.safetensors" --out "$RUNS/eval"
