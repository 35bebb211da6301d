#!/usr/bin/env bash
# An ensemble per fold from runs that already exist (`mpoxscope ensemble`, no retraining), evaluated on each fold's
# validation and test parts, laid out as a cv folder (OUT/foldK/{run,validation,evaluation}) for
# benchmarks/posthoc_members.py. Each MEMBER is a run path with {fold} where the fold name goes, e.g.
#   bash benchmarks/assemble_cv.sh runs/asm_28 \
#     'runs/cv_default_ens_scratch/{fold}/run/members/tf_efficientnet_lite0-seed0' \
#     'runs/cv_default_ens_scratch/{fold}/run/members/tf_efficientnet_lite2-seed0-frozen' \
#     'runs/cv_l2e2e260_ens/{fold}/run/members/tf_efficientnet_lite2-seed0'
# Members may read different image sizes. Finished parts are skipped. PYTHON=.venv/bin/python; FOLDS="fold1 fold2".
set -euo pipefail
out=${1:?usage: assemble_cv.sh OUT MEMBER MEMBER ... (each a run path containing {fold\})}
shift
[ $# -ge 2 ] || { echo "assemble_cv.sh: give at least two members" >&2; exit 2; }
py=${PYTHON:-python}
for fold in ${FOLDS:-fold1 fold2 fold3 fold4 fold5}; do
  runs=()
  for m in "$@"; do runs+=("${m//\{fold\}/$fold}"); done
  [ -f "$out/$fold/run/model.json" ] || "$py" -m mpoxscope.cli ensemble "${runs[@]}" --out "$out/$fold/run" --quiet
  for split in validation test; do
    sub=$([ "$split" = test ] && echo evaluation || echo validation)
    [ -f "$out/$fold/$sub/predictions.csv" ] && continue
    "$py" -m mpoxscope.cli evaluate "$out/$fold/run" --split "$split" --out "$out/$fold/$sub"
  done
done
