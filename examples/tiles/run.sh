#!/usr/bin/env bash
# A long computation cut into overlapping tiles, one piece each, merged back in order.
#   bash examples/tiles/run.sh [OUT_DIR] [LENGTH] [TILES] [WINDOW]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"; length="${2:-20000}"; tiles="${3:-16}"; window="${4:-50}"
python3 "$here/make.py" "$out" "$length" "$tiles"
# the series is staged by content ({file:series}): the same on a remote host or Slurm
job=$(sheepdog map --items "$out/tiles.csv" --key tile --detach \
      -- python3 "$here/tile.py" {file:series} {start} {end} "$window")
echo "job $job: sheepdog status $job (progress, rate and ETA), or its page under sheepdog serve"
sheepdog logs "$job" --follow > /dev/null || true
sheepdog status "$job"
sheepdog result "$job" --out "$out" > /dev/null
python3 "$here/merge.py" "$out/items.jsonl" "$out/series.txt" "$window"
