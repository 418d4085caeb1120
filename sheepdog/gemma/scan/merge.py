"""Gathering per-chromosome GEMMA results into one, after checking the pieces agree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import GatherError
from ..commands import p_column, p_value, parse_log
from ..formats.bimbam import chromosome_order

# What every piece of one scan must have in common, as its GEMMA log states it.
AGREE = ("version", "individuals", "total_individuals")
WHOLE = ""  # the chromosome of a scan's one LMM piece without LOCO: every chromosome
_PIECE = "lmm chr "


def piece_name(chromosome: str) -> str:
    """The name of the LMM piece of a chromosome (WHOLE: of every SNP)."""
    return "lmm all SNPs" if chromosome == WHOLE else _PIECE + chromosome


def lmm_chromosome(name: str) -> str | None:
    """The chromosome of an LMM piece by its name (WHOLE for all SNPs), None if it is
    not one."""
    if name == piece_name(WHOLE):
        return WHOLE
    return name.removeprefix(_PIECE) if name.startswith(_PIECE) else None


@dataclass
class Piece:
    """One LMM piece's output (a chromosome's, or every SNP's): its assoc file and its
    GEMMA log."""

    chromosome: str  # WHOLE: the piece holds every chromosome's SNPs
    assoc: Path
    log: Path
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return piece_name(self.chromosome)


# flags naming a piece's own files: whether -c was given must match, not its path
PIECE_FILES = frozenset({"-g", "-p", "-a", "-k", "-c", "-o", "-outdir"})


def _options(log_text: str) -> list[str]:
    """The GEMMA options of a run that must match across pieces: every flag with its
    value, but only the presence of the per-piece files."""
    line = next((ln for ln in log_text.splitlines() if "Command Line Input" in ln), "")
    words = line.split("=", 1)[-1].split()[1:]  # past `gemma`
    keep = []
    for i, w in enumerate(words):
        if not w.startswith("-") or _value(w):
            continue
        keep.append(w)
        nxt = words[i + 1] if i + 1 < len(words) else ""
        if w not in PIECE_FILES and nxt and (not nxt.startswith("-") or _value(nxt)):
            keep.append(nxt)
    return keep


def _value(word: str) -> bool:
    """A negative number, not a flag."""
    try:
        float(word)
    except ValueError:
        return False
    return True


def check_agreement(pieces: list[Piece]) -> dict[str, str]:
    """The facts all pieces share; GatherError names the piece and field that differ."""
    if not pieces:
        raise GatherError("no pieces to gather")
    seen: dict[str, str] = {}
    for piece in pieces:
        text = piece.log.read_text(errors="replace")
        piece.facts = parse_log(text)
        piece.facts["options"] = " ".join(_options(text))
        if piece.facts["complete"] != "1":
            raise GatherError(f"piece '{piece.name}': its GEMMA log is incomplete"
                              " (no 'total computation time')")
    first = pieces[0]
    for name in (*AGREE, "options"):
        seen[name] = first.facts.get(name, "")
        for piece in pieces[1:]:
            value = piece.facts.get(name, "")
            if value != seen[name]:
                raise GatherError(
                    f"piece '{piece.name}': field '{name}' is {value!r}, but "
                    f"piece '{first.name}' has {seen[name]!r}")
    chroms = [p.chromosome for p in pieces]
    if WHOLE in chroms and len(chroms) > 1:
        raise GatherError(f"piece '{piece_name(WHOLE)}' holds every chromosome: it is "
                          "gathered alone")
    dupes = {c for c in chroms if chroms.count(c) > 1}
    if dupes:
        raise GatherError(f"chromosome(s) {sorted(dupes)} appear in more than one piece")
    return seen


def merge(pieces: list[Piece], out: Path) -> dict[str, Any]:
    """Write one assoc file in genome order; every SNP exactly once, in its own piece."""
    facts = check_agreement(pieces)
    header: list[str] | None = None
    rows: list[tuple[tuple[int, str], int, int, str, list[str]]] = []
    owner: dict[str, Piece] = {}
    for order, piece in enumerate(sorted(pieces, key=lambda p: chromosome_order(p.chromosome))):
        with open(piece.assoc) as f:
            this_header = f.readline().rstrip("\n").split("\t")
            if header is None:
                header = this_header
            elif this_header != header:
                raise GatherError(f"piece '{piece.name}': field 'header' is "
                                  f"{this_header}, expected {header}")
            for number, line in enumerate(f, start=2):
                cols = line.rstrip("\n").split("\t")
                chrom, rs, ps = cols[0], cols[1], cols[2]
                if piece.chromosome not in (WHOLE, chrom):
                    raise GatherError(f"piece '{piece.name}': line {number} "
                                      f"has SNP {rs} on chromosome {chrom}")
                if rs in owner:
                    raise GatherError(f"SNP {rs} appears twice: in piece "
                                      f"'{owner[rs].name}' and in piece '{piece.name}'")
                owner[rs] = piece
                rows.append((chromosome_order(chrom), int(float(ps)), order, rs, cols))
    assert header is not None
    rows.sort(key=lambda r: (r[0], r[1]))
    with open(out, "w") as f:
        f.write("\t".join(header) + "\n")
        for *_, cols in rows:
            f.write("\t".join(cols) + "\n")
    pcol = header.index(p_column(header))
    tested = [(p, r) for r in rows if (p := p_value(r[4][pcol])) is not None]
    top = [r for _, r in sorted(tested, key=lambda pr: pr[0])[:10]]  # nan is never a hit
    return {
        "header": header, "p_column": header[pcol], "snps": len(rows), "facts": facts,
        "chromosomes": _chromosomes(pieces, rows),
        "top_hits": [hit(header, r[4], pcol) for r in top],
    }


def _chromosomes(pieces: list[Piece], rows: list[Any]) -> list[str]:
    """The scan's chromosomes in genome order: its pieces', or its SNPs' for one piece of
    all SNPs."""
    if pieces[0].chromosome == WHOLE:
        return list(dict.fromkeys(r[4][0] for r in rows))
    return [p.chromosome for p in sorted(pieces, key=lambda p: chromosome_order(p.chromosome))]


def hit(header: list[str], cols: list[str], pcol: int) -> dict[str, Any]:
    p = float(cols[pcol])
    return {"chr": cols[0], "rs": cols[1], "ps": int(float(cols[2])), header[pcol]: p,
            "minus_log10_p": -math.log10(p) if p > 0 else math.inf}


def read_min_p(assoc: Path, rule: str = "sheepdog") -> tuple[float, str, str]:
    """(smallest p, its chromosome, its SNP) of one assoc file.

    rule "sheepdog": the mode's p column, every value (a p that underflowed to 0 is the
    strongest signal); "gemma-wrapper": the last column, only p > 0, as gemma-wrapper
    takes its permutation minima.
    """
    with open(assoc) as f:
        header = f.readline().rstrip("\n").split("\t")
        wrapper = rule == "gemma-wrapper"
        pcol = len(header) - 1 if wrapper else header.index(p_column(header))
        best = (math.inf, "", "")
        for line in f:
            cols = line.rstrip("\n").split("\t")
            p = p_value(cols[pcol])
            if p is not None and p < best[0] and (p > 0 or not wrapper):
                best = (p, cols[0], cols[1])
    return best
