"""Trait tables keyed by individual: `id, trait1, trait2, ...` as TSV or CSV (GN's
exports, R/qtl2's pheno and covar files), matched to the genotypes by id, not by order."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from .bimbam import MISSING, lines

NA_STRINGS = frozenset({"NA", "", "-", "NaN", "nan", "x"})


@dataclass
class TraitTable:
    """Values by individual (rows) and trait (columns); NaN where missing."""

    path: Path
    traits: list[str]
    individuals: list[str]
    values: np.ndarray  # individuals x traits, float64
    line_of: dict[str, int] = field(default_factory=dict)  # individual -> line number


def _cells(text: str, sep: str | None) -> list[str]:
    if sep is None:
        sep = "\t" if "\t" in text else ","
    return [c.strip().strip('"') for c in text.split(sep)]


def has_header(path: Path) -> bool:
    """Is the first line a header (a word that is neither a number nor NA)?"""
    for _, text in lines(path):
        for cell in _cells(text, None)[1:] or _cells(text, None):
            if cell in NA_STRINGS:
                continue
            try:
                float(cell)
            except ValueError:
                return True
        return False
    return False


def read(path: Path, sep: str | None = None, na_strings: Iterable[str] = NA_STRINGS,
         comment: str = "#", what: str = "trait") -> TraitTable:
    """A table with a header row; each problem names the file, line and column."""
    na = frozenset(na_strings) | {""}
    header: list[str] = []
    ids: list[str] = []
    rows: list[list[float]] = []
    line_of: dict[str, int] = {}
    for number, text in lines(path):
        if comment and text.lstrip().startswith(comment):
            continue
        cells = _cells(text, sep)
        if not header:
            header = cells
            _check_names(path, header, number, what)
            continue
        if len(cells) != len(header):
            raise InputError(str(path), f"has {len(cells)} columns; the header has "
                             f"{len(header)}", number)
        ind = cells[0]
        if not ind:
            raise InputError(str(path), "column 1: the individual id is empty", number)
        if ind in line_of:
            raise InputError(str(path), f"column 1: individual {ind!r} is also on line "
                             f"{line_of[ind]}", number)
        line_of[ind] = number
        ids.append(ind)
        rows.append([_number(c, na, path, number, i + 2, header[i + 1])
                     for i, c in enumerate(cells[1:])])
    if not header:
        raise InputError(str(path), f"the {what} file is empty")
    if not ids:
        raise InputError(str(path), f"the {what} file has a header but no individuals")
    values = np.array(rows, dtype=np.float64).reshape(len(ids), len(header) - 1)
    return TraitTable(path, header[1:], ids, values, line_of)


def _check_names(path: Path, header: list[str], number: int, what: str) -> None:
    if len(header) < 2:
        raise InputError(str(path), f"expected a header 'id, {what}1, {what}2, ...'", number)
    seen: dict[str, int] = {}
    for i, name in enumerate(header[1:], start=2):
        if not name:
            raise InputError(str(path), f"column {i}: the {what} id is empty", number)
        if name in seen:
            raise InputError(str(path), f"column {i}: {what} id {name!r} is also column "
                             f"{seen[name]}", number)
        seen[name] = i


def _number(cell: str, na: frozenset[str], path: Path, number: int, column: int,
            name: str) -> float:
    if cell in na:
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise InputError(str(path), f"column {column} ({name}): {cell!r} is not a number "
                         f"or missing ({', '.join(sorted(n for n in na if n) or ['NA'])})",
                         number) from None
    if not math.isfinite(value):
        raise InputError(str(path), f"column {column} ({name}): {cell!r} is not a finite "
                         "number", number)
    return value


@dataclass
class Aligned:
    """A table's values in the genotypes' individual order (NaN for the ungenotyped)."""

    traits: list[str]
    values: np.ndarray  # genotype individuals x traits
    without_values: int  # genotyped individuals the table has no row for


def align(table: TraitTable, individuals: list[str], genotypes: Path) -> Aligned:
    """Rows in genotype order; an individual the genotypes lack is an error naming it."""
    where = {ind: i for i, ind in enumerate(individuals)}
    out = np.full((len(individuals), len(table.traits)), np.nan)
    for row, ind in enumerate(table.individuals):
        slot = where.get(ind)
        if slot is None:
            raise InputError(str(table.path), f"individual {ind!r} is not in the genotypes "
                             f"({genotypes}); remove its row or genotype it",
                             table.line_of.get(ind))
        out[slot] = table.values[row]
    return Aligned(table.traits, out, len(individuals) - len(table.individuals))


def by_order(table: TraitTable, count: int, genotypes: Path) -> Aligned:
    """BIMBAM genotypes carry no ids: the rows must be the genotype columns, in order."""
    if len(table.individuals) != count:
        raise InputError(str(table.path), f"has {len(table.individuals)} individuals but the "
                         f"BIMBAM genotypes ({genotypes}) have {count}, matched by order (BIMBAM "
                         "has no ids: give GN .geno or R/qtl2 genotypes to match by id)")
    return Aligned(table.traits, table.values.copy(), 0)


def text(value: float) -> str:
    """A value as GEMMA reads it back exactly (repr round-trips a float64)."""
    return MISSING if math.isnan(value) else repr(float(value))


def column_file(values: np.ndarray, out: Path) -> None:
    """One value per line: a BIMBAM phenotype file."""
    out.write_text("".join(text(v) + "\n" for v in values))


def covariate_file(values: np.ndarray, out: Path) -> None:
    """GEMMA's covariates need the intercept: a column of 1s first, unless one is there."""
    has_intercept = any(bool(np.all(values[:, j] == 1.0)) for j in range(values.shape[1]))
    rows = []
    for row in values:
        cells = [text(v) for v in row]
        rows.append("\t".join(cells if has_intercept else ["1", *cells]) + "\n")
    out.write_text("".join(rows))
