"""Stitch the tiles back (in order, each window once) and check against a direct run."""

import json
import sys

items, series_path, window = sys.argv[1], sys.argv[2], int(sys.argv[3])
merged: list[float] = []
for line in open(items):
    record = json.loads(line)
    assert record["status"] == "success", record
    tile = json.loads(record["output"])
    assert tile["start"] == len(merged), f"tile {record['key']} starts at {tile['start']}"
    merged += tile["max"]
values = [float(v) for v in open(series_path).read().split()]
direct = [max(values[i:i + window]) for i in range(len(values) - window + 1)]
assert merged == direct, "the tiles do not add up to the direct computation"
print(f"{len(merged)} windows from the tiles, equal to the direct computation")
