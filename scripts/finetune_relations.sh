#!/usr/bin/env bash
# Teach a trained model the relations ("left of", "above"): a text encoder pretrained with hard negatives, then the
# model's UNet fine-tuned onto it. Every stage resumes when the script is run again (a stop saves a checkpoint).
#   scripts/finetune_relations.sh INIT [RUNS_DIR]     (INIT: the model to start from, e.g. the shipped one)
# Why (MODEL_CARD.md, 2026-11-27): the UNet reads the caption mostly at the start token and at the end token with
# the padding; an encoder pretrained without hard negatives changes there by 3% when a relation is turned round,
# so the UNet had nothing to learn the relation from. Hard negatives (the same words meaning another scene) make
# the encoder carry it: 62% there after 1,831 hard-negative steps on top of 1,500 plain ones (bf16 on a Zen4); in
# fp32 (a Xeon) 32% after 2,300 and 70% after all 4,500 (neg_acc 0.85 at 3,800, 0.93-0.99 from step ~3,900):
# hence the default stop at the end of the schedule (TEXT_STOP=3331 reproduces the bf16 run's stop).
# Stages (each skipped once its result exists):
#   text      1,500 steps of plain contrastive pretraining (as train_default_model.sh)
#   textneg   the same run continued with --hard-negatives on a 6,000-step schedule, stopped at step TEXT_STOP
#             (scripts/relation_probe.py MODEL --state RUNS/textneg/step-N --text-only measures the change above)
#   unet_a    INIT's UNet on that encoder (frozen), weighted to the noisy end where the layout is decided
#   unet_b    from unet_a, closer to uniform timesteps (what single objects and counting need), with EMA
#   unet_c .. unet_f   C_STAGES stages of C_STEPS at uniform timesteps, each from the one before (0 skips them):
#             on the CPU the UNet was still relearning its shapes after unet_b (overall 0.764, then 0.833, 0.859,
#             0.870 and 0.868: a plateau on one cache)
#   unet_g .. unet_i   G_STAGES stages of G_STEPS, each on a fresh cache (seeds SEED+1, SEED+2, SEED+3: new
#             scenes): 0.886 and held-out 0.821 (release 10), 0.889 and 0.885 (release 11), 0.893 and 0.897 (release 12)
#   unet_j    J_STEPS steps (0: none) on the next fresh cache with the scene mix J_KINDS and colour
#             drop J_COLOR_DROP: ShapesEval's two-object and counting prompts name no colour, which the default
#             stream says of a pair in ~0.2% of scenes; this mix says it far more often (release 13: overall 0.903,
#             0.895 over four seeds; two objects 0.844 on one seed but 0.781 over four; held-out 0.821)
#   unet_k    K_STEPS steps (0: none) on the next fresh cache, the same mix with colour drop K_COLOR_DROP: the
#             bindings back (release 14: 0.910; 0.899 over four seeds, two objects 0.811, held-out gap 3.6)
#   unet_l    L_STEPS steps (0: none) on the next fresh cache, counting scenes more often (L_KINDS, colour drop
#             L_COLOR_DROP); alone 0.896 over four seeds, but `soup`, the average of its weights and the stage
#             before's (`sdengine merge`), is release 15: 0.903 over four seeds, every category >= 0.81, gap 3.7
# The CACHE scenes of --seed SEED are encoded once (unet_a) and reused up to unet_f (same VAE, tokenizer). Knobs
# (environment): TEXT_STOP (6000), A_STEPS (859), B_STEPS (1715), B_EXTRA ("--timestep-shift 2"), C_STEPS (3000),
# C_STAGES (4, at most 4), G_STEPS (2000), G_STAGES (3, at most 3), J_STEPS (2000), J_KINDS
# (single,relation,counting,pair,relation,counting,pair,relation,combination), J_COLOR_DROP (0.3), K_STEPS
# (2000), K_COLOR_DROP (0.15), L_STEPS (2000), L_KINDS (J_KINDS and one more counting), L_COLOR_DROP (0.2); for
# the UNet stages BATCH (64), LR (1e-4), WARMUP (50), CACHE (100000 scenes), SEED (8), SAVE_EVERY (100) and
# COMPILE (1: --compile); CLIP_SKIP (1) is the encoder layer the UNet reads from unet_a on (3: the second of four,
# where scripts/binding_probe.py finds the held-out pairs' shapes kept).
# On a GPU, e.g. BATCH=1024 LR=2e-4 WARMUP=100 CACHE=400000 A_STEPS=300 B_STEPS=1500 C_STEPS=0 G_STEPS=0
# J_STEPS=0 K_STEPS=0 L_STEPS=0 COMPILE=1 (0.3 M and 1.5 M images in the UNet stages against the CPU's 55 k,
# 110 k, four times 192 k and six times 128 k; the text stages keep batch 128).
set -euo pipefail
INIT=${1:?usage: finetune_relations.sh INIT [RUNS_DIR]}
RUNS=${2:-/work/runs/relations}
TEXT_STOP=${TEXT_STOP:-6000} A_STEPS=${A_STEPS:-859} B_STEPS=${B_STEPS:-1715} B_EXTRA=${B_EXTRA:---timestep-shift 2}
C_STEPS=${C_STEPS:-3000} C_STAGES=${C_STAGES:-4} G_STEPS=${G_STEPS:-2000} G_STAGES=${G_STAGES:-3}
J_STEPS=${J_STEPS:-2000} J_COLOR_DROP=${J_COLOR_DROP:-0.3} K_STEPS=${K_STEPS:-2000} K_COLOR_DROP=${K_COLOR_DROP:-0.15}
L_STEPS=${L_STEPS:-2000} L_COLOR_DROP=${L_COLOR_DROP:-0.2}
L_KINDS=${L_KINDS:-single,relation,counting,pair,relation,counting,pair,relation,combination,counting}
J_KINDS=${J_KINDS:-single,relation,counting,pair,relation,counting,pair,relation,combination}
SEED=${SEED:-8}
FRESH_SEED=$SEED  # the fresh-cache stages count up from here
mkdir -p "$RUNS"

resume_flag() { compgen -G "$1/step-*" > /dev/null && echo --resume || true; }
# stage RESULT COMMAND...: run COMMAND unless RESULT exists; a stage stopped early (SIGTERM saves a checkpoint and
# exits 0) leaves no RESULT and ends the script rather than starting the next stage
stage() {
  local result=$1
  shift
  [ -f "$result" ] || "$@"
  [ -f "$result" ] && return 0
  echo "finetune_relations.sh: $(dirname "$result") stopped before its end; run again to resume" >&2
  exit 1
}

stage "$RUNS/text/text.safetensors" sdengine train text --data shapes --out "$RUNS/text" \
  $(resume_flag "$RUNS/text") --steps 1500 --batch 128 --lr 3e-4 --save-every 250
if [ ! -d "$RUNS/textneg" ]; then  # continue the plain run's checkpoints, not its result
  mkdir -p "$RUNS/textneg"
  cp -r "$RUNS/text/tokenizer" "$RUNS/text/log.jsonl" "$RUNS/textneg/"
  cp -r "$(compgen -G "$RUNS/text/step-*" | sort | tail -1)" "$RUNS/textneg/"
fi
stage "$RUNS/textneg/text.safetensors" sdengine train text --data shapes --out "$RUNS/textneg" --resume \
  --hard-negatives --steps 6000 --stop-at "$TEXT_STOP" --batch 128 --lr 3e-4 --save-every 250
TEXT=$RUNS/textneg/text.safetensors
UNET=(--data shapes --batch "${BATCH:-64}" --lr "${LR:-1e-4}" --warmup "${WARMUP:-50}"
      --cache-latents "${CACHE:-100000}" --save-every "${SAVE_EVERY:-100}")
[ "${COMPILE:-0}" = 1 ] && UNET+=(--compile)

stage "$RUNS/unet_a/model.safetensors" sdengine train unet --init "$INIT" --text "$TEXT" --out "$RUNS/unet_a" \
  $(resume_flag "$RUNS/unet_a") "${UNET[@]}" --seed "$SEED" --steps "$A_STEPS" --snr-floor 1 --timestep-shift 3 \
  --ema 0 --clip-skip "${CLIP_SKIP:-1}"  # the later stages start from unet_a's model, which reads that layer already
# next_unet NAME PREVIOUS SEED ARGS...: train NAME from PREVIOUS's model on the scenes of --seed SEED
next_unet() {
  local name=$1 previous=$2 seed=$3
  shift 3
  stage "$RUNS/$name/model.safetensors" sdengine train unet --init "$RUNS/$previous/model.safetensors" \
    --out "$RUNS/$name" $(resume_flag "$RUNS/$name") "${UNET[@]}" --seed "$seed" "$@"
}
# continue_unet NAME PREVIOUS ARGS...: next_unet on unet_a's latent cache (the same inputs: hardlinked, not rebuilt)
continue_unet() {
  local name=$1 previous=$2
  shift 2
  [ -f "$RUNS/$name/model.safetensors" ] && return 0
  mkdir -p "$RUNS/$name"
  ln -f "$RUNS/unet_a/latents.safetensors" "$RUNS/$name/latents.safetensors"
  next_unet "$name" "$previous" "$SEED" "$@"
}
# shellcheck disable=SC2086  # B_EXTRA is a list of arguments
continue_unet unet_b unet_a --steps "$B_STEPS" --snr-floor 0.3 $B_EXTRA
LAST=unet_b
for name in unet_c unet_d unet_e unet_f; do  # C_STAGES of them, each from the one before
  [ "$C_STEPS" -gt 0 ] && [ "$C_STAGES" -gt 0 ] || break
  continue_unet "$name" "$LAST" --steps "$C_STEPS" --snr-floor 0.3
  LAST=$name C_STAGES=$((C_STAGES - 1))
done
for name in unet_g unet_h unet_i; do  # G_STAGES on fresh caches: each the next seed's scenes, new batch order and noise
  [ "$G_STEPS" -gt 0 ] && [ "$G_STAGES" -gt 0 ] || break
  FRESH_SEED=$((FRESH_SEED + 1))
  next_unet "$name" "$LAST" "$FRESH_SEED" --steps "$G_STEPS" --snr-floor 0.3
  LAST=$name G_STAGES=$((G_STAGES - 1))
done
if [ "$J_STEPS" -gt 0 ]; then  # uncoloured pairs and counts said more often
  FRESH_SEED=$((FRESH_SEED + 1))
  next_unet unet_j "$LAST" "$FRESH_SEED" --steps "$J_STEPS" --snr-floor 0.3 --scene-kinds "$J_KINDS" \
    --color-drop "$J_COLOR_DROP"
  LAST=unet_j
fi
if [ "$K_STEPS" -gt 0 ]; then  # the same mix, colours said as often as by default again
  FRESH_SEED=$((FRESH_SEED + 1))
  next_unet unet_k "$LAST" "$FRESH_SEED" --steps "$K_STEPS" --snr-floor 0.3 --scene-kinds "$J_KINDS" \
    --color-drop "$K_COLOR_DROP"
  LAST=unet_k
fi
if [ "$L_STEPS" -gt 0 ]; then  # counting a little more often; then the average of the last two stages' weights
  FRESH_SEED=$((FRESH_SEED + 1))
  next_unet unet_l "$LAST" "$FRESH_SEED" --steps "$L_STEPS" --snr-floor 0.3 --scene-kinds "$L_KINDS" \
    --color-drop "$L_COLOR_DROP"
  [ -f "$RUNS/soup/model.safetensors" ] || { mkdir -p "$RUNS/soup" && sdengine merge "$RUNS/$LAST/model.safetensors" \
    "$RUNS/unet_l/model.safetensors" --alpha 0.5 --out "$RUNS/soup/model.safetensors"; }
  LAST=soup
fi
sdengine eval --model "$RUNS/$LAST/model.safetensors" --seeds 1 --compile --out "$RUNS/eval" --quiet
