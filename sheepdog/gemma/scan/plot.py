"""The Manhattan plot of a merged scan, as PNG (Pillow) and SVG (written directly).

One layout, two renderers. matplotlib drew the same figure, but importing it held the
worker's GIL for ~0.45 s and drawing took another ~0.25 s, a quarter of a cold BXD
scan; this takes a few hundredths of a second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from PIL import Image, ImageDraw, ImageFont

from ..commands import minus_log10, p_column, p_value
from ..formats.bimbam import chromosome_order

WIDTH, HEIGHT = 1200, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 36, 50
COLOURS = ("#1f4e79", "#6fa8dc")
THRESHOLD_COLOURS = {"significant": "#c00000", "suggestive": "#e69138"}
GAP = 1e7  # base pairs between chromosomes
FLOOR = 300.0  # -log10 of a p printed as 0


@dataclass
class Layout:
    """Everything both renderers draw, in pixels."""

    title: str
    y_label: str
    points: list[tuple[float, float, int]] = field(default_factory=list)  # x, y, colour
    x_ticks: list[tuple[float, str]] = field(default_factory=list)
    y_ticks: list[tuple[float, str]] = field(default_factory=list)
    lines: list[tuple[float, str, str]] = field(default_factory=list)  # y, name, colour
    links: list[str] = field(default_factory=list)  # per point, when points are links


def _read(assoc: Path) -> tuple[str, dict[str, tuple[list[float], list[float]]]]:
    by_chrom: dict[str, tuple[list[float], list[float]]] = {}
    with open(assoc) as f:
        header = f.readline().rstrip("\n").split("\t")
        name = p_column(header)
        pcol, chrcol, poscol = header.index(name), header.index("chr"), header.index("ps")
        for line in f:
            cols = line.split("\t")
            xs, ys = by_chrom.setdefault(cols[chrcol], ([], []))
            p = p_value(cols[pcol])
            if p is None:
                continue  # GEMMA's nan: no point (its chromosome still has its place)
            xs.append(float(cols[poscol]))
            ys.append(minus_log10(p, FLOOR))
    return name, by_chrom


def _step(top: float) -> float:
    """A round tick spacing giving at most about eight ticks up to `top`."""
    raw = max(top, 1e-9) / 8
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def layout(assoc: Path, title: str = "", thresholds: dict[str, float] | None = None) -> Layout:
    """Chromosomes side by side in genome order, -log10 p upwards."""
    name, by_chrom = _read(assoc)
    return layout_of(by_chrom, title or "GEMMA LOCO scan", f"-log10({name})", thresholds)


def layout_of(by_chrom: dict[str, tuple[list[float], list[float]]], title: str, y_label: str,
              thresholds: dict[str, float] | None = None,
              links: dict[str, list[str]] | None = None,
              extents: dict[str, float] | None = None) -> Layout:
    """The plot of points (position in bp, height) per chromosome; `links`: per
    chromosome, one link per point (the SVG makes each point a link); `extents`: every
    chromosome's length in bp, so each has its place and label, points or not."""
    lines = {k: -math.log10(p) for k, p in (thresholds or {}).items() if p > 0}
    top = max([y for _, ys in by_chrom.values() for y in ys] + list(lines.values()) + [1.0])
    step = _step(top)
    top = math.ceil(top * 1.05 / step) * step
    extents = extents or {}
    by_chrom = {**{c: ([], []) for c in extents}, **by_chrom}
    length = {c: max([extents.get(c, 0.0), *by_chrom[c][0]]) for c in by_chrom}
    order = sorted(by_chrom, key=chromosome_order)
    starts, offset = {}, 0.0
    for chrom in order:
        starts[chrom] = offset
        offset += length[chrom] + GAP
    span = max(offset - GAP, 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + 0.01 * plot_w + x / span * 0.98 * plot_w

    def py(y: float) -> float:
        return TOP + plot_h * (1 - y / top)

    out = Layout(title, y_label)
    for i, chrom in enumerate(order):
        xs, ys = by_chrom[chrom]
        out.points += [(px(starts[chrom] + x), py(y), i % 2) for x, y in zip(xs, ys, strict=True)]
        if links is not None:
            out.links += links.get(chrom, [])
        out.x_ticks.append((px(starts[chrom] + length[chrom] / 2), chrom))
    ticks = int(top / step + 1e-9)
    out.y_ticks = [(py(k * step), f"{k * step:g}") for k in range(ticks + 1)]
    out.lines = [(py(y), k, THRESHOLD_COLOURS.get(k, "#c00000")) for k, y in lines.items()]
    return out


def _key_y(row: int) -> float:
    """The legend's rows sit in the margin above the plot, right of the title: a
    threshold line (inside the plot) is never under them."""
    return 10 + 13 * row


def svg(lay: Layout) -> str:
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="11">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{WIDTH / 2}" y="22" text-anchor="middle" font-size="14">'
             f'{escape(lay.title)}</text>']
    for shade in (0, 1):
        parts.append(f'<g fill="{COLOURS[shade]}">')
        if lay.links:
            parts += [f'<a href="{escape(link, {chr(34): "&quot;"})}" target="_top">'
                      f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/></a>'
                      for (x, y, c), link in zip(lay.points, lay.links, strict=True)
                      if c == shade]
        else:
            parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="1.6"/>'
                      for x, y, c in lay.points if c == shade]
        parts.append("</g>")
    for y, name, colour in lay.lines:
        parts.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                     f'stroke="{colour}" stroke-dasharray="6 4"><title>{name}</title></line>')
    parts.append(f'<path d="M{LEFT} {TOP}V{bottom}H{right}" fill="none" stroke="black"/>')
    for x, label in lay.x_ticks:
        parts.append(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" '
                     f'stroke="black"/><text x="{x:.1f}" y="{bottom + 16}" '
                     f'text-anchor="middle">{escape(label)}</text>')
    for y, label in lay.y_ticks:
        parts.append(f'<line x1="{LEFT - 4}" y1="{y:.1f}" x2="{LEFT}" y2="{y:.1f}" '
                     f'stroke="black"/><text x="{LEFT - 7}" y="{y + 4:.1f}" '
                     f'text-anchor="end">{label}</text>')
    parts.append(f'<text x="{(LEFT + right) / 2}" y="{HEIGHT - 10}" text-anchor="middle">'
                 f'chromosome</text>')
    parts.append(f'<text transform="translate(18 {(TOP + bottom) / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(lay.y_label)}</text>')
    for i, (_, name, colour) in enumerate(lay.lines):
        key_y = _key_y(i)
        parts.append(f'<line x1="{right - 120}" y1="{key_y}" x2="{right - 96}" y2="{key_y}" '
                     f'stroke="{colour}" stroke-dasharray="6 4"/><text x="{right - 90}" '
                     f'y="{key_y + 4}">{escape(name)}</text>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def png(lay: Layout, path: Path) -> None:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font, big = ImageFont.load_default(11), ImageFont.load_default(14)
    bottom, right = HEIGHT - BOTTOM, WIDTH - RIGHT
    draw.text((WIDTH / 2, 22), lay.title, fill="black", font=big, anchor="ms")
    for x, y, c in lay.points:
        draw.ellipse((x - 1.6, y - 1.6, x + 1.6, y + 1.6), fill=COLOURS[c])
    for y, _, colour in lay.lines:
        _dashed(draw, LEFT, right, y, colour)
    draw.line([(LEFT, TOP), (LEFT, bottom), (right, bottom)], fill="black")
    for x, label in lay.x_ticks:
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.text((x, bottom + 16), label, fill="black", font=font, anchor="ms")
    for y, label in lay.y_ticks:
        draw.line([(LEFT - 4, y), (LEFT, y)], fill="black")
        draw.text((LEFT - 7, y), label, fill="black", font=font, anchor="rm")
    draw.text(((LEFT + right) / 2, HEIGHT - 10), "chromosome", fill="black", font=font,
              anchor="ms")
    sideways = Image.new("RGB", (int(draw.textlength(lay.y_label, font=font)) + 4, 14), "white")
    ImageDraw.Draw(sideways).text((2, 0), lay.y_label, fill="black", font=font)
    turned = sideways.rotate(90, expand=True)
    image.paste(turned, (8, int((TOP + bottom) / 2 - turned.height / 2)))
    for i, (_, name, colour) in enumerate(lay.lines):
        key_y = _key_y(i)
        _dashed(draw, right - 120, right - 96, key_y, colour)
        draw.text((right - 90, key_y), name, fill="black", font=font, anchor="lm")
    image.save(path, optimize=False)


def _dashed(draw: ImageDraw.ImageDraw, x0: float, x1: float, y: float, colour: str) -> None:
    x = x0
    while x < x1:
        draw.line([(x, y), (min(x + 6, x1), y)], fill=colour, width=1)
        x += 10


def manhattan(assoc: Path, out_stem: Path, title: str = "",
              thresholds: dict[str, float] | None = None) -> list[Path]:
    """Draw -log10 p along the genome; threshold lines where given (as p values)."""
    lay = layout(assoc, title, thresholds)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".svg")]
    png(lay, paths[0])
    paths[1].write_text(svg(lay))
    return paths
