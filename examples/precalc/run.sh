#!/usr/bin/env bash
# Precalculate a model over a reference library: first a sample-only run, validated,
# then served by key; a key that was not computed is an explicit answer, never silence.
#   bash examples/precalc/run.sh [OUT_DIR] [SAMPLE]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"; sample="${2:-20}"
sheepdog map --items "$here/library.csv" --key id --sample "$sample" --seed 1 --cache \
  --chunk 5 --out "$out" --json -- python3 "$here/model.py" {id} {smiles} > "$out.job.json"
python3 "$here/validate.py" "$out/items.jsonl"
job=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$out.job.json")
first=$(python3 -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["key"])' \
        "$out/items.jsonl")
echo "served by key: sheepdog result $job --item $first"
sheepdog result "$job" --item "$first"
echo "a key outside the sample:"
sheepdog result "$job" --item EOS9999 || echo "(explicit: no such item)"
