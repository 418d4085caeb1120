"""One tile of a sliding-window maximum over a long series: reads positions
[start, end + window - 1) (the overlap with the next tile) and prints the maximum of each
window starting in [start, end) as JSON."""

import json
import sys

series_path, start, end, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
values = [float(v) for v in open(series_path).read().split()]
part = values[start:end + window - 1]
print(json.dumps({"start": start, "max": [max(part[i:i + window])
                                          for i in range(min(end, len(values) - window + 1)
                                                         - start)]}))
