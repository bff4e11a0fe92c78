#!/usr/bin/env bash
# The extractor's ablation table (BENCHMARKS.md, "Extractor"): trains `configs/extractor.py:tiny`
# with each component on and off, and TiTok's `tiny` at the same token budget, 1500 steps each on
# the sample photographs, then measures them with benchmarks/extractor.py.
#   bash benchmarks/extractor_ablation.sh [OUT_DIR]      (default /tmp/titok_jax_extractor; ~40 min on 2 cores)
# Finished runs are kept: rerunning the script only trains what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${1:-/tmp/titok_jax_extractor}
mkdir -p "$OUT"
train() {  # NAME CONFIG [--config.KEY=VALUE ...]
  local name=$1 config=$2; shift 2
  if [ -f "$OUT/$name/eval.jsonl" ] && grep -q '"step": 1500' "$OUT/$name/eval.jsonl"; then
    echo "$name: trained"; return
  fi
  echo "$name: training ($config $*)"
  "$PY" -m titok_jax train --config "$config" --workdir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
train full       configs/extractor.py:tiny
train no_mae     configs/extractor.py:tiny --config.masking.encoder_ratios='(0.0,)'
train no_nested  configs/extractor.py:tiny --config.masking.nested_dropout=none
train no_decmask configs/extractor.py:tiny --config.masking.decoder_ratios='(1.0,)'
train no_repa    configs/extractor.py:tiny --config.repa.weight=0.0
train titok      configs/titok.py:tiny
"$PY" benchmarks/extractor.py evaluate --out "$OUT/evaluate.json" \
  full="$OUT/full" no_mae="$OUT/no_mae" no_nested="$OUT/no_nested" \
  no_decmask="$OUT/no_decmask" no_repa="$OUT/no_repa" titok="$OUT/titok"
