#!/usr/bin/env bash
# The GPU check: on a bare machine with one NVIDIA GPU, in under 8 minutes, the seed presets'
# training-step throughput, MFU and peak memory at the chosen batch sizes, bf16 against fp32.
#
#   bash bench/gpu_check.sh                 # install (venv .bench/venv-gpu, pip install -e .), then measure
#   PYTHON=/path/to/python bash bench/gpu_check.sh   # use an environment that has volclf and a CUDA torch
#   bash bench/gpu_check.sh --cpu-smoke     # the same Python part on CPU at tiny sizes (seconds; no install)
#
# Installs nothing beyond the project's own requirements: a virtual environment with
# `pip install -e .` (on Linux x86_64, PyPI's torch wheel is a CUDA build; set TORCH_INDEX_URL,
# e.g. https://download.pytorch.org/whl/cu124, to pick one for an older driver). MONAI is not
# a requirement, so the peer comparison is left to bench/train.py on a machine that has it.
#
# Environment: VIT_BATCH (default 16,256), CNN_BATCH (default 2,1): the batch sizes measured,
# comma-separated; BUDGET_S (default 480): the whole script's time limit, installation
# included; LOG (default .bench/gpu_check-<host>-<time>.log): a copy of everything printed.
#
# Why these batches: 16 is the vit seed preset's batch, 256 the largest power of two that fits
# an A100 40 GB by volclf's estimate; 2 is the cnn seed preset's batch (the largest that fits
# 40 GB under bf16), 1 the batch at which its fp32 run fits too, for the bf16-against-fp32
# ratio. fp32 at the larger batches is expected to report "OOM" on 40 GB. See bench/README.md.
set -euo pipefail

START=$(date +%s)
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODE=gpu
case "${1:-}" in
  --cpu-smoke) MODE=cpu ;;
  "") ;;
  -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown option '$1' (valid: --cpu-smoke, --help)" >&2; exit 2 ;;
esac

BUDGET_S=${BUDGET_S:-480}
VIT_BATCH=${VIT_BATCH:-16,256}
CNN_BATCH=${CNN_BATCH:-2,1}
mkdir -p .bench
LOG=${LOG:-.bench/gpu_check-$(hostname)-$(date +%Y%m%d-%H%M%S).log}
exec > >(tee -a "$LOG") 2>&1
echo "== volclf GPU check ($MODE), $(date -Is) on $(hostname); log: $LOG"

elapsed() { echo $(( $(date +%s) - START )); }

if [[ $MODE == gpu ]]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check.sh: nvidia-smi not found: this machine has no NVIDIA driver (use --cpu-smoke to test the script on CPU)" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

# ---- the Python environment: PYTHON if given, else .bench/venv-gpu with the project's requirements
if [[ -n "${PYTHON:-}" ]]; then
  PY=$PYTHON
elif [[ $MODE == cpu ]]; then
  PY=${ROOT}/.venv/bin/python
  [[ -x $PY ]] || PY=$(command -v python3)
else
  VENV=${VENV:-.bench/venv-gpu}   # .bench/ is git-ignored
  if [[ ! -x $VENV/bin/python ]]; then
    python3 -m venv "$VENV"
  fi
  PY=$VENV/bin/python
  echo "== installing the project's requirements into $VENV ($(elapsed) s)"
  "$PY" -m pip install --quiet --upgrade pip
  if [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    "$PY" -m pip install --quiet torch --index-url "$TORCH_INDEX_URL"
  fi
  "$PY" -m pip install --quiet -e .
fi
"$PY" - "$MODE" <<'EOF'
import sys
import torch
import volclf
print(f"== torch {torch.__version__} (CUDA {torch.version.cuda}), volclf {volclf.__version__}, python {sys.version.split()[0]}")
if sys.argv[1] == "gpu" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch cannot use the GPU (a CPU-only wheel, or a driver older than the wheel's CUDA);"
             " set TORCH_INDEX_URL to a matching CUDA build, e.g. https://download.pytorch.org/whl/cu124")
EOF

# ---- the measurements, inside what is left of the budget
LEFT=$(( BUDGET_S - $(elapsed) - 20 ))   # 20 s for start-up and the last prints
if (( LEFT < 90 )); then
  echo "gpu_check.sh: only ${LEFT} s of the ${BUDGET_S} s budget left after installation; raise BUDGET_S" >&2
  exit 1
fi
SOFT=$(( LEFT * 3 / 4 ))   # bench/train.py starts no new repeat after this; the rest is slack for the last one
echo "== measuring ($(elapsed) s elapsed, ${LEFT} s left, soft budget ${SOFT} s)"

if [[ $MODE == gpu ]]; then
  ARGS=(--device cuda --presets seed --archs cnn vit --variants volclf fp32-eager channels-last
        --batch-size "vit:seed=$VIT_BATCH" --batch-size "cnn:seed=$CNN_BATCH"
        --repeats 3 --steps 5 --warmup 3 --no-peer --budget-s "$SOFT")
else  # the same flags, forced onto the CPU at tiny sizes
  ARGS=(--device cpu --tiny --presets tiny --archs vit cnn --variants volclf fp32-eager channels-last
        --batch-size "vit:tiny=4,8" --batch-size "cnn:tiny=4,2"
        --repeats 2 --steps 2 --warmup 1 --no-peer --budget-s "$SOFT")
fi
status=0
timeout --kill-after=10 "$LEFT" "$PY" bench/train.py "${ARGS[@]}" || status=$?
if (( status == 124 || status == 137 )); then
  echo "gpu_check.sh: bench/train.py ran past the ${LEFT} s left of the budget and was stopped" >&2
fi
echo "== done in $(elapsed) s (exit $status); log: $LOG"
exit "$status"
