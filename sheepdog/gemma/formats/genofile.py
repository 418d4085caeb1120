"""GeneNetwork's `.geno` genotype files, read and converted to BIMBAM.

    # comments
    @name:BXD
    @type:riset
    @mat:B
    @pat:D
    @het:H
    @unk:U
    Chr  Locus  cM  Mb  BXD1  BXD2 ...
    1    rs31443144  1.50  3.010274  B  B ...

The coding follows GN2's own conversion for GEMMA (and GEMMA's BXD example, which came
from GN): the maternal allele counts 1, the paternal 0, a heterozygote 0.5, unknown NA.
gemma-wrapper's `gn-geno-to-gemma` writes 2/0/1 instead: the same p-values, effects
halved. Positions come from the Mb column (bp = Mb x 10^6), or from cM when there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ...errors import InputError
from .bimbam import MISSING, lines

HEADER_KEYS = ("name", "type", "mat", "pat", "het", "unk")
DEFAULT_CODES = {"mat": "B", "pat": "D", "het": "H", "unk": "U"}
DOSAGE = {"mat": "1", "pat": "0", "het": "0.5", "unk": MISSING}


@dataclass
class Geno:
    """What a .geno file says about itself, and its individuals in column order."""

    path: Path
    header: dict[str, str] = field(default_factory=dict)
    individuals: list[str] = field(default_factory=list)
    markers: int = 0

    def codes(self) -> dict[str, str]:
        """Genotype letter -> BIMBAM dosage text, from the @ lines (GN's defaults else)."""
        found = {role: self.header.get(role, DEFAULT_CODES[role]) for role in DEFAULT_CODES}
        return {letter: DOSAGE[role] for role, letter in found.items()}


def looks_like_geno(path: Path) -> bool:
    """A .geno file starts with `#`/`@` lines or the `Chr Locus` table header."""
    for _, text in lines(path):
        first = text.lstrip()
        if first.startswith(("#", "@")):
            return True
        return first.split("\t")[0].split()[:1] == ["Chr"] and "Locus" in first
    return False


def _header_line(geno: Geno, text: str, number: int) -> None:
    key, sep, value = text[1:].partition(":")
    key = key.strip().lower()
    if not sep or not value.strip():
        raise InputError(str(geno.path), f"header line {text!r} is not '@key:value'", number)
    if key in ("mat", "pat", "het", "unk") and len(value.split()) != 1:
        raise InputError(str(geno.path), f"@{key} must be one code, got {value.strip()!r}",
                         number)
    geno.header[key] = value.strip()


def _columns(geno: Geno, text: str, number: int) -> tuple[int, int]:
    """The table header: (index of the position column, first individual's column)."""
    names = [c.strip() for c in text.split("\t")] if "\t" in text else text.split()
    if names[:3] != ["Chr", "Locus", "cM"]:
        raise InputError(str(geno.path), "expected the table header 'Chr Locus cM Mb "
                         f"<individuals>', got {' '.join(names[:4])!r}", number)
    first = 4 if len(names) > 3 and names[3] == "Mb" else 3
    geno.individuals = names[first:]
    if not geno.individuals:
        raise InputError(str(geno.path), "the table header names no individuals", number)
    seen: dict[str, int] = {}
    for i, name in enumerate(geno.individuals):
        if name in seen:
            raise InputError(str(geno.path), f"individual {name!r} is named twice (columns "
                             f"{seen[name] + first + 1} and {i + first + 1})", number)
        seen[name] = i
    return first - 1, first


def _position(text: str, column: int, path: Path, number: int) -> int:
    """Mb (or cM) as GEMMA's whole-number position: x 10^6."""
    try:
        return int(round(float(text) * 1e6))
    except (ValueError, OverflowError):
        raise InputError(str(path), f"column {column + 1}: position {text!r} is not a number",
                         number) from None


def convert(path: Path, geno_out: TextIO, anno_out: TextIO) -> Geno:
    """Write the BIMBAM genotypes and annotation of a .geno file; every problem names
    the file, line and column."""
    geno = Geno(path)
    pos_col = first = -1
    codes: dict[str, str] = {}
    seen: dict[str, int] = {}
    for number, text in lines(path):
        if first < 0:
            stripped = text.strip()
            if stripped.startswith("#"):
                continue
            if stripped.startswith("@"):
                _header_line(geno, stripped, number)
                continue
            pos_col, first = _columns(geno, text, number)
            codes = geno.codes()
            continue
        cells = [c.strip() for c in text.split("\t")] if "\t" in text else text.split()
        if len(cells) != first + len(geno.individuals):
            raise InputError(str(path), f"has {len(cells) - first} genotypes; the header "
                             f"names {len(geno.individuals)} individuals", number)
        chrom, locus = cells[0], cells[1]
        if locus in seen:
            raise InputError(str(path), f"column 2: marker {locus!r} is also on line "
                             f"{seen[locus]}", number)
        seen[locus] = number
        position = _position(cells[pos_col], pos_col, path, number)
        dosages = []
        for i, letter in enumerate(cells[first:]):
            dosage = codes.get(letter)
            if dosage is None:
                raise InputError(str(path), f"column {first + i + 1} ({geno.individuals[i]}): "
                                 f"genotype {letter!r} is not one the header declares "
                                 f"({', '.join(sorted(codes))})", number)
            dosages.append(dosage)
        geno_out.write(f"{locus}, X, Y, " + ", ".join(dosages) + "\n")
        anno_out.write(f"{locus}\t{position}\t{chrom}\n")
        geno.markers += 1
    if first < 0:
        raise InputError(str(path), "no 'Chr Locus cM Mb' table header found")
    if not geno.markers:
        raise InputError(str(path), "the genotype table has no markers")
    return geno
