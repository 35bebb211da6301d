#!/usr/bin/env bash
# Usage: bash benchmarks/explain_fold1.sh RUN_DIR OUT_DIR   (run from the repository root)
set -euo pipefail
RUN=${1:?run directory}; OUT=${2:-explain_fold1}
LIST=$(mktemp)
# fold1 test images, interleaved by class so the first N used for faithfulness span all classes
${BIN:-.venv/bin}/python - > "$LIST" <<'PY'
import itertools, pandas as pd
from mpoxscope.data.samples import msld_root
root = msld_root(); f = pd.read_csv(root / "folds.csv")
t = f[(f.fold == "fold1") & (f.split == "test")]
groups = [[str(root / "images" / c / n) for n in g.filename] for c, g in t.groupby("class", sort=True)]
for p in itertools.chain.from_iterable(itertools.zip_longest(*groups)):
    if p: print(p)
PY
# gallery of all test images (fast methods + attention) and faithfulness on the first 20
${BIN:-.venv/bin}/mpoxscope explain "$RUN" $(cat "$LIST") --out "$OUT" --threads 1 \
  --method gradcam,gradcam++,hirescam,xgradcam,layercam,eigencam --faithfulness --faithfulness-images 20
# Score-CAM (one forward pass per live channel: ~1-1.5 min per 224 px image on one thread) on the first 5
${BIN:-.venv/bin}/mpoxscope explain "$RUN" $(head -5 "$LIST") --out "$OUT/scorecam" --threads 1 \
  --method scorecam --no-attention --faithfulness --faithfulness-images 5
