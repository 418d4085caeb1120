"""Make the series and the tile table: TILES rows of (tile, start, end, series)."""

import math
import sys
from pathlib import Path

out, length, tiles = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
series = [round(math.sin(i / 7.0) * 10 + (i * 7919 % 13), 3) for i in range(length)]
(out / "series.txt").write_text("\n".join(map(str, series)) + "\n")
size = -(-length // tiles)
with open(out / "tiles.csv", "w") as f:
    f.write("tile,start,end,series\n")
    for t in range(tiles):
        f.write(f"{t},{t * size},{min(length, (t + 1) * size)},{out / 'series.txt'}\n")
