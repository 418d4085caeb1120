"""R/qtl2 inputs: a control file (YAML or JSON) naming CSVs, read and converted to BIMBAM.

    crosstype: risib            # risib, riself, dh, bc, f2: crosses of two alleles
    geno: bxd_geno.csv          # id,marker1,...  (or markers as rows: geno_transposed)
    pheno: bxd_pheno.csv        # id,trait1,...
    covar: bxd_covar.csv        # id,covariate1,...
    pmap: bxd_pmap.csv          # marker,chr,pos (Mb); or gmap (cM)
    genotypes: {B: 1, D: 2}
    na.strings: ['-', 'NA']
    comment.char: '#'
    geno_transposed: true

R/qtl2 codes genotypes 1 = AA, 2 = AB (bc, f2) or BB (RI, dh), 3 = BB (f2). The BIMBAM
dosage counts the first allele, as GN counts its maternal one: AA 1, AB 0.5, BB 0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import yaml

from ...errors import InputError
from .bimbam import MISSING, lines

# crosstype -> R/qtl2 genotype number -> dosage of the first allele
DOSAGES: dict[str, dict[int, str]] = {
    "risib": {1: "1", 2: "0"}, "riself": {1: "1", 2: "0"}, "dh": {1: "1", 2: "0"},
    "bc": {1: "1", 2: "0.5"}, "f2": {1: "1", 2: "0.5", 3: "0"},
}
DEFAULT_GENOTYPES = {"A": 1, "H": 2, "B": 3}
DEFAULT_NA = ("-", "NA")


@dataclass
class Control:
    """A parsed control file; file names resolved against its directory."""

    path: Path
    crosstype: str
    geno: Path
    positions: Path  # pmap if given, else gmap
    pheno: Path | None = None
    covar: Path | None = None
    genotypes: dict[str, int] = field(default_factory=dict)
    na_strings: tuple[str, ...] = DEFAULT_NA
    sep: str = ","
    comment: str = "#"
    transposed: bool = False

    def files(self) -> list[Path]:
        return [p for p in (self.geno, self.positions, self.pheno, self.covar) if p]


def looks_like_control(path: Path) -> bool:
    return path.suffix.lower() in (".yaml", ".yml", ".json") and _load(path) is not None


def _load(path: Path) -> dict[str, Any] | None:
    try:
        text = path.read_text(errors="replace")
        found = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return found if isinstance(found, dict) and "geno" in found else None


def _file(path: Path, spec: dict[str, Any], key: str, required: bool,
          confine: tuple[str, ...]) -> Path | None:
    value = spec.get(key)
    if value is None:
        if required:
            raise InputError(str(path), f"the control file names no {key!r} file")
        return None
    if not isinstance(value, str) or not value or "\0" in value:
        raise InputError(str(path), f"{key!r} must name one file, got {str(value)[:80]!r}")
    found = path.parent / value  # an absolute value stays absolute
    if confine and not any(found.resolve().is_relative_to(Path(d).resolve())
                           for d in confine):
        # refused before it is opened: neither its content nor its existence is told
        raise InputError(str(path), f"{key!r} names {value[:200]!r}, which is not beside "
                         "the control file (in its upload or bundle, or under an input root)")
    if not found.is_file():
        raise InputError(str(path), f"{key!r} names {value[:200]!r}, which does not exist "
                         "beside the control file")
    return found


def read_control(path: Path, confine: tuple[str, ...] = ()) -> Control:
    """The control file, checked: cross type, every named file present, codes sane.
    `confine`: the directories its files must be in (a request's upload and the input
    roots; nothing for a user's own command line)."""
    if not path.is_file():
        raise InputError(str(path), "control file does not exist or is not a file")
    spec = _load(path)
    if spec is None:
        raise InputError(str(path), "not an R/qtl2 control file (YAML or JSON naming 'geno')")
    cross = str(spec.get("crosstype", ""))
    if cross not in DOSAGES:
        raise InputError(str(path), f"crosstype {cross!r}: sheepdog reads the two-allele "
                         f"crosses {', '.join(DOSAGES)}")
    geno = _file(path, spec, "geno", True, confine)
    positions = (_file(path, spec, "pmap", False, confine)
                 or _file(path, spec, "gmap", False, confine))
    if positions is None:
        raise InputError(str(path), "the control file names neither 'pmap' nor 'gmap'")
    codes = spec.get("genotypes", DEFAULT_GENOTYPES)
    if not isinstance(codes, dict) or not all(
            isinstance(v, int) and v in DOSAGES[cross] for v in codes.values()):
        raise InputError(str(path), f"'genotypes' must map codes to "
                         f"{sorted(DOSAGES[cross])} for a {cross} cross, got {codes!r}")
    na = spec.get("na.strings", list(DEFAULT_NA))
    na = [na] if isinstance(na, str) else na
    assert geno is not None
    return Control(path, cross, geno, positions, _file(path, spec, "pheno", False, confine),
                   _file(path, spec, "covar", False, confine),
                   {str(k): v for k, v in codes.items()},
                   tuple(str(x) for x in na), str(spec.get("sep", ",")),
                   str(spec.get("comment.char", "#")), bool(spec.get("geno_transposed", False)))


def _rows(control: Control, path: Path) -> list[tuple[int, list[str]]]:
    found = []
    for number, text in lines(path):
        if control.comment and text.lstrip().startswith(control.comment):
            continue
        found.append((number, [c.strip().strip('"') for c in text.split(control.sep)]))
    if not found:
        raise InputError(str(path), "the file is empty")
    return found


def read_positions(control: Control) -> dict[str, tuple[str, int]]:
    """marker -> (chromosome, position as GEMMA's whole number: Mb or cM x 10^6)."""
    out: dict[str, tuple[str, int]] = {}
    for number, cells in _rows(control, control.positions)[1:]:
        if len(cells) < 3:
            raise InputError(str(control.positions), "expected 'marker,chr,pos'", number)
        marker, chrom, pos = cells[:3]
        if marker in out:
            raise InputError(str(control.positions), f"column 1: marker {marker!r} is named "
                             "twice", number)
        try:
            out[marker] = (chrom, int(round(float(pos) * 1e6)))
        except ValueError:
            raise InputError(str(control.positions), f"column 3: position {pos!r} of "
                             f"{marker} is not a number", number) from None
    return out


def _genotype_table(control: Control) -> tuple[list[str], list[tuple[str, int, list[str]]]]:
    """(individuals, [(marker, line, codes per individual)]) whichever way the file runs."""
    rows = _rows(control, control.geno)
    header = rows[0][1]
    if control.transposed:
        individuals = header[1:]
        markers = [(cells[0], number, cells[1:]) for number, cells in rows[1:]]
        for marker, number, cells in markers:
            if len(cells) != len(individuals):
                raise InputError(str(control.geno), f"marker {marker} has {len(cells)} "
                                 f"genotypes; the header names {len(individuals)} individuals",
                                 number)
        return individuals, markers
    individuals = [cells[0] for _, cells in rows[1:]]
    for number, cells in rows[1:]:
        if len(cells) != len(header):
            raise InputError(str(control.geno), f"has {len(cells)} columns; the header has "
                             f"{len(header)}", number)
    by_marker = [(name, rows[0][0], [cells[j + 1] for _, cells in rows[1:]])
                 for j, name in enumerate(header[1:])]
    return individuals, by_marker


def convert(control: Control, geno_out: TextIO, anno_out: TextIO) -> list[str]:
    """Write BIMBAM genotypes and annotation; returns the individuals in column order."""
    positions = read_positions(control)
    individuals, markers = _genotype_table(control)
    seen: set[str] = set()
    for ind in individuals:
        if ind in seen:
            raise InputError(str(control.geno), f"individual {ind!r} is named twice")
        seen.add(ind)
    dosage = {code: DOSAGES[control.crosstype][number]
              for code, number in control.genotypes.items()}
    dosage.update({na: MISSING for na in control.na_strings})
    for marker, number, cells in markers:
        place = positions.get(marker)
        if place is None:
            raise InputError(str(control.geno), f"marker {marker!r} is not in "
                             f"{control.positions.name}", number)
        out = []
        for i, code in enumerate(cells):
            value = dosage.get(code)
            if value is None:
                raise InputError(str(control.geno), f"individual {individuals[i]}, marker "
                                 f"{marker}: genotype {code!r} is not in the control file's "
                                 f"'genotypes' or 'na.strings'", number)
            out.append(value)
        geno_out.write(f"{marker}, X, Y, " + ", ".join(out) + "\n")
        anno_out.write(f"{marker}\t{place[1]}\t{place[0]}\n")
    if not markers:
        raise InputError(str(control.geno), "names no markers")
    return individuals
