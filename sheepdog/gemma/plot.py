"""The Manhattan plot of a merged scan, as PNG and SVG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure  # noqa: E402

from .bimbam import chromosome_order  # noqa: E402
from .commands import p_column  # noqa: E402


def manhattan(assoc: Path, out_stem: Path, title: str = "",
              thresholds: dict[str, float] | None = None) -> list[Path]:
    """Draw -log10 p along the genome; threshold lines in p where given."""
    by_chrom: dict[str, tuple[list[float], list[float]]] = {}
    with open(assoc) as f:
        header = f.readline().rstrip("\n").split("\t")
        pcol = header.index(p_column(header))
        for line in f:
            cols = line.split("\t")
            p = float(cols[pcol])
            xs, ys = by_chrom.setdefault(cols[0], ([], []))
            xs.append(float(cols[2]))
            ys.append(-math.log10(p) if p > 0 else 300.0)
    fig = Figure(figsize=(12, 4), dpi=100)
    ax = fig.add_subplot()
    offset, ticks, labels = 0.0, [], []
    for i, chrom in enumerate(sorted(by_chrom, key=chromosome_order)):
        xs, ys = by_chrom[chrom]
        # rasterized points keep the SVG small and quick to write; axes stay vector
        ax.scatter([x + offset for x in xs], ys, s=4, rasterized=True,
                   color="#1f4e79" if i % 2 == 0 else "#6fa8dc", linewidths=0)
        span = max(xs) if xs else 0.0
        ticks.append(offset + span / 2)
        labels.append(chrom)
        offset += span + 1e7
    for name, p in (thresholds or {}).items():
        ax.axhline(-math.log10(p), linestyle="--", linewidth=1,
                   color="#c00000" if name == "significant" else "#e69138", label=name)
    if thresholds:
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_xlabel("chromosome")
    ax.set_ylabel(f"-log10({header[pcol]})")
    ax.set_title(title or "GEMMA LOCO scan")
    ax.margins(x=0.01)
    fig.tight_layout()
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    for path in paths:
        fig.savefig(path)
    return paths
