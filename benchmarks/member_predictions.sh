#!/usr/bin/env bash
# Per-member validation and test predictions of a finished ensemble `cv`, laid out as cv folders
# (OUT_PREFIX<member>/foldK/{validation,evaluation}/predictions.csv) so that benchmarks/posthoc_members.py can
# pair single members of one run with other runs or members (an ensemble cv scores only the whole ensemble).
# Each member is evaluated with its own test-time views and temperature, as the ensemble averages it; the pair
# of members re-combined by posthoc_members.py reproduces the cv's own pooled numbers.
#   bash benchmarks/member_predictions.sh CV_DIR OUT_PREFIX [DATA]
# About 1 minute per member and fold for a Lite2 at 260 px with 8 views (2-core CPU). Finished parts are skipped.
set -euo pipefail
cv=${1:?usage: member_predictions.sh CV_DIR OUT_PREFIX [DATA]}
prefix=${2:?usage: member_predictions.sh CV_DIR OUT_PREFIX [DATA]}
data=("${@:3:1}")  # DATA if given; else evaluate reads the data each member was trained on
py=${PYTHON:-python}
shopt -s nullglob
folds=("$cv"/fold*/run/members)
[ ${#folds[@]} -gt 0 ] || { echo "$cv: no fold*/run/members (not an ensemble cv?)" >&2; exit 2; }
for members in "${folds[@]}"; do
  fold=$(basename "$(dirname "$(dirname "$members")")")
  for member in "$members"/*/; do
    name=$(basename "$member")
    for split in validation test; do
      sub=$([ "$split" = test ] && echo evaluation || echo validation)
      out="$prefix$name/$fold/$sub"
      [ -f "$out/predictions.csv" ] && continue
      "$py" -m mpoxscope.cli evaluate "$member" "${data[@]}" --split "$split" --out "$out"
    done
  done
done
