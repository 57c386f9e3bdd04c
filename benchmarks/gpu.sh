#!/usr/bin/env bash
# The GPU table of issue 33 (target 7) in one command, at most 8 minutes, installing nothing:
#   bash benchmarks/gpu.sh [--steps 50] [--batches 1,8] [--repeats 2] [--budget 400]
#   bash benchmarks/gpu.sh --dry-run     # the same flow on a CPU with a tiny model (seconds)
# Python: $PYTHON if set, else the first of .venv/bin/python, python3, python whose torch sees a CUDA device (for
# --dry-run, whose torch imports). A GPU box's torch may live outside the carried .venv (which holds a CPU torch):
# then the .venv's site-packages are added after that Python's own, for diffusers and transformers (the
# references) without shadowing its CUDA torch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

dry=0
for arg in "$@"; do
  case "$arg" in --dry-run | -h | --help) dry=1 ;; esac
done
if [ "$dry" = 1 ]; then
  probe='import torch'
else
  probe='import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'
fi

candidates=()
if [ -n "${PYTHON:-}" ]; then candidates+=("$PYTHON"); fi
candidates+=("$ROOT/.venv/bin/python" python3 python)
py=""
for c in "${candidates[@]}"; do
  if command -v "$c" >/dev/null 2>&1 && "$c" -c "$probe" >/dev/null 2>&1; then py="$c"; break; fi
done
if [ -z "$py" ]; then
  echo "gpu.sh: no Python here has a torch that sees a CUDA device (tried: ${candidates[*]});" \
       "set PYTHON=/path/to/python, or run with --dry-run to check the flow on a CPU" >&2
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1; then
      "$c" -c 'import sys, torch; print(f"  {sys.executable}: torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available: {torch.cuda.is_available()}")' 1>&2 2>/dev/null \
        || echo "  $c: no torch" >&2
    fi
  done
  exit 2
fi

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # sdengine from this tree, installed or not
extra=""
venv_site=$(ls -d "$ROOT"/.venv/lib/python*/site-packages 2>/dev/null | head -n 1 || true)
py_version=$("$py" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
if [ -n "$venv_site" ] && [ "$py" != "$ROOT/.venv/bin/python" ] \
   && [ "$(basename "$(dirname "$venv_site")")" = "$py_version" ]; then
  extra="$venv_site"  # appended after this Python's own site-packages (PYTHONPATH would come before them)
fi
echo "gpu.sh: $("$py" -c 'import sys; print(sys.executable)')${extra:+ + $extra}" >&2
# a hard stop past the 8 minutes (the script's --budget skips the cases that would not fit, well before)
exec timeout --signal=INT --kill-after=10 470 "$py" -c '
import runpy, site, sys
extra, script = sys.argv[1], sys.argv[2]
if extra:
    site.addsitedir(extra)
sys.argv = sys.argv[2:]
sys.path.insert(0, script.rsplit("/", 1)[0])  # as `python script` does: its folder first
runpy.run_path(script, run_name="__main__")
' "$extra" "$ROOT/benchmarks/gpu_bench.py" "$@"
