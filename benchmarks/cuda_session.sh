#!/usr/bin/env bash
# One GPU session (about 9 minutes on one H100/H200) for the measurements a CPU cannot make in time:
#   W. (WARMUP=1, the default; 0 skips it) benchmarks/cuda_warmup.py: a training step's first and second time at
#      each batch size the default meets, per memory format — the cause of the slow first epochs;
#   A. the default's 5-fold cv on the official folds, alone on the GPU, timed (issue 8: "under 5 minutes, GPU-bound"),
#      with GPU utilisation sampled every 0.5 s;
#   B. the default configuration under the LEAKY protocols B_PROTOCOLS (default: image-level, then augment-then-split
#      with --copies COPIES), then one protocols table whose official row is A's test predictions (--official-from), assembled
#      from the finished protocol summaries (issue 9).
# Nothing new starts after DEADLINE seconds; running steps are stopped then, and what finished is packed.
# Needs mpoxscope importable (PYTHONPATH=src) and its wheels (.whl/, see benchmarks/results/cuda.md); writes logs
# and tar.gz files of the reports (no weights, no images) to $OUT.
#   OUT=/tmp/out bash benchmarks/cuda_session.sh [DATA]
set -u
DATA="${1:-${MPOXSCOPE_MSLD:-../shared/data/msld_v2}}"
OUT="${OUT:-/tmp/mpoxscope_cuda}"
W="${WORK:-/tmp/mpoxscope_cuda_work}"
DEADLINE="${DEADLINE:-540}"
COPIES="${COPIES:-3}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
SPLIT="${SPLIT:-$DATA/datalog.xlsx}"
read -r -a EXTRA <<< "${EXTRA:-}"  # more options for every command (a dry run: DEVICE=cpu EXTRA="--preset tiny")
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/log.txt") 2>&1
MS=("$PY" -m mpoxscope.cli)
left() { local l=$((DEADLINE - SECONDS)); echo $((l > 1 ? l : 1)); }
cap() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
pack() { tar czf "$OUT/$1.tgz" -C "$W" --exclude='*.safetensors' --exclude='*.pt' --exclude='augmented' "$1" || true; }
stamp() { echo "[$(date +%T) t=${SECONDS}s] $*"; }

{ nvidia-smi; nproc; "$PY" -c "import torch, timm, sklearn; print('torch', torch.__version__, 'timm', timm.__version__,
'sklearn', sklearn.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 500 > "$OUT/gpu_util.csv" &
SMI=$!

if [ "${WARMUP:-1}" = 1 ]; then  # W: what a first epoch's seconds go to (benchmarks/cuda_warmup.py), ~1-2 min
    stamp "W: first-step time per batch size and memory format"
    timeout "$(cap 150)" "$PY" "$(dirname "$0")/cuda_warmup.py" --out "$OUT/cuda_warmup.json"
    stamp "W: rc=$?"
fi

stamp "A: default cv, official folds, alone on the GPU"
s=$SECONDS
timeout --signal=INT "$(cap 420)" "${MS[@]}" cv "$DATA" --split-file "$SPLIT" --out "$W/cv_default" \
    --exclude-leaks --device "$DEVICE" --workers 8 "${EXTRA[@]}"
stamp "A: rc=$? wall $((SECONDS - s)) s"
pack cv_default

P=(protocols "$DATA" --split-file "$SPLIT" --device "$DEVICE" --workers 8 --copies "$COPIES" "${EXTRA[@]}")
# One after the other: side by side (2026-11-26) both sat in their frozen member's PIL-augmented feature bank, one
# CPU thread each, with the GPU idle, and neither finished. B_PROTOCOLS picks which leaky protocols run here (a
# session too short for both runs one and the other on a CPU).
read -r -a BP <<< "${B_PROTOCOLS:-image-level augment-then-split}"
for p in "${BP[@]}"; do
    stamp "B: $p"
    s=$SECONDS
    timeout --signal=INT "$(left)" "${MS[@]}" "${P[@]}" --protocols "$p" --out "$W/p_$p" > "$OUT/b_$p.log" 2>&1
    stamp "B: $p rc=$? wall $((SECONDS - s)) s"
done
mkdir -p "$W/protocols/work"
cp "$W"/p_*/work/*.summary.json "$W/protocols/work/" 2>/dev/null
# One table of what finished (a protocol without its summary would be run again here: leave it out).
done_p=()
[ -f "$W/cv_default/cv_summary.json" ] && done_p+=(official)
for p in image-level augment-then-split; do [ -f "$W/protocols/work/$p.summary.json" ] && done_p+=("$p"); done
official=(); [ -f "$W/cv_default/cv_summary.json" ] && official=(--official-from "$W/cv_default")
list=$(IFS=,; echo "${done_p[*]}")
[ -n "$list" ] && timeout 120 "${MS[@]}" "${P[@]}" --out "$W/protocols" "${official[@]}" --protocols "$list"
stamp "B: table rc=$?"
kill "$SMI" 2>/dev/null
pack protocols
tail -n 40 "$OUT"/b_*.log
stamp "done"
