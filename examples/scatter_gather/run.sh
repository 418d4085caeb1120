#!/usr/bin/env bash
# Scatter records over the workers in chunks, require every answer to agree on the
# fields all predictors must share, and gather the answers in request order.
#   bash examples/scatter_gather/run.sh [RECORDS.csv] [OUT_DIR]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
records="${1:-$here/records.csv}"
out="${2:-$here/out}"
sheepdog map --items "$records" --key id --chunk 3 --timeout 30 \
  --check species_actual --check type_actual --out "$out" \
  -- python3 "$here/predict.py" {id} {species} {sequence}
python3 "$here/merge.py" "$out/items.jsonl" > "$out/predictions.json"
echo "predictions in $out/predictions.json"
