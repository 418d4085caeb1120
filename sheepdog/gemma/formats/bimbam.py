"""Reading, validating and splitting BIMBAM inputs, streaming, never the whole matrix.

Every problem is reported with the file, the line and what is wrong, before any task
runs. Plain or gzipped files and Windows line endings are all accepted.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...defaults import MAX_CHROMOSOMES, MAX_INPUT_LINE
from ...errors import InputError

MISSING = "NA"
NAN = "nan"  # what NA becomes in a parsed row
_CHROMOSOME = re.compile(r"^(chr)?([0-9]+|X|Y|M|MT|XY|Un)$", re.IGNORECASE)


def open_text(path: Path) -> io.TextIOBase:
    """A text reader for a plain or gzipped file; errors name the file."""
    try:
        with open(path, "rb") as probe:
            magic = probe.read(2)
    except OSError as e:
        raise InputError(str(path), f"cannot read: {e.strerror or e}") from e
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, text without line ending), skipping blank lines; bad gzip named.

    A line longer than MAX_INPUT_LINE is refused as it is read: a small gzip that
    expands to one huge line never costs more memory than that.
    """
    try:
        with open_text(path) as f:
            number = 0
            while raw := f.readline(MAX_INPUT_LINE + 1):
                number += 1
                if len(raw) > MAX_INPUT_LINE:
                    raise InputError(str(path), f"line is longer than {MAX_INPUT_LINE:,d} "
                                     "characters", number)
                text = raw.rstrip("\r\n")
                if text.strip():
                    yield number, text
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise InputError(str(path), f"not a valid gzip file ({e})") from e


def chromosome_order(name: str) -> tuple[int, str]:
    """Genome order: 1..N numerically, then X, Y, M and anything else by name."""
    bare = re.sub("^chr", "", name, flags=re.IGNORECASE)
    if bare.isdigit():
        return (int(bare), "")
    return (10_000 + {"X": 0, "Y": 1, "XY": 2, "M": 3, "MT": 3}.get(bare.upper(), 9), bare)


@dataclass
class Annotation:
    """SNP -> (position, chromosome), plus the original lines for per-chromosome files."""

    position: dict[str, int] = field(default_factory=dict)
    chromosome: dict[str, str] = field(default_factory=dict)


def read_annotation(path: Path) -> Annotation:
    ann = Annotation()
    for number, text in lines(path):
        parts = text.replace(",", " ").split()
        if len(parts) < 3:
            raise InputError(str(path), f"expected 'rs position chromosome', got {text!r}",
                             number)
        rs, pos, chrom = parts[0], parts[1], parts[2]
        if not _CHROMOSOME.match(chrom):
            raise InputError(str(path), f"unknown chromosome {chrom!r} for SNP {rs}", number)
        try:
            ann.position[rs] = int(float(pos))
        except ValueError as e:
            raise InputError(str(path), f"position {pos!r} of SNP {rs} is not a number",
                             number) from e
        ann.chromosome[rs] = chrom
    if not ann.chromosome:
        raise InputError(str(path), "the annotation file is empty")
    return ann


def _numeric(tokens: list[str], path: Path, number: int, first_column: int) -> np.ndarray:
    """The row as numbers (NaN for NA); an error names the first column that is not one."""
    try:
        if MISSING in tokens:  # a C-speed test first: most rows have no NA
            tokens = [NAN if t == MISSING else t for t in tokens]
        return np.asarray(tokens, dtype=np.float64)
    except ValueError:
        for i, t in enumerate(tokens):
            try:
                if t != MISSING:
                    float(t)
            except ValueError:
                raise InputError(str(path), f"column {first_column + i}: {t!r} is not a "
                                 f"number or {MISSING}", number) from None
        raise InputError(str(path), "not every value is a number", number) from None


class NpyRows:
    """Rows of float64 appended one at a time to an .npy file (header written at close),
    so a chromosome's genotype matrix reaches its kinship task without ever being held
    in memory whole and without the text being parsed twice."""

    HEADER = 128  # bytes, a multiple of 64 as the format asks

    def __init__(self, path: Path, width: int) -> None:
        self.path, self.width, self.rows = path, width, 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER)

    def append(self, row: np.ndarray) -> None:
        self.file.write(row.tobytes())
        self.rows += 1

    def close(self) -> None:
        meta = repr({"descr": "<f8", "fortran_order": False, "shape": (self.rows, self.width)})
        head = b"\x93NUMPY\x01\x00"
        size = self.HEADER - len(head) - 2
        self.file.seek(0)
        self.file.write(head + size.to_bytes(2, "little") + meta.encode().ljust(size - 1) + b"\n")
        self.file.close()


def geno_fields(text: str) -> list[str]:
    """BIMBAM rows are comma separated (GEMMA also accepts blanks); a trailing comma is fine."""
    if "," in text:
        parts = text.replace(" ", "").replace("\t", "").split(",")
        if parts and parts[-1] == "":
            parts.pop()
        return parts
    return text.split()


@dataclass
class Split:
    """Per-chromosome geno and annotation files of one genotype data set."""

    individuals: int
    snps: int
    # name -> {"geno": path, "matrix": .npy path, "anno": path, "snps": n}
    chromosomes: dict[str, dict[str, object]]

    def ordered(self) -> list[str]:
        return sorted(self.chromosomes, key=chromosome_order)


def split_genotypes(geno: Path, anno_path: Path, out_dir: Path,
                    max_chromosomes: int = MAX_CHROMOSOMES) -> Split:
    """Validate the geno file against the annotation while writing one file per chromosome."""
    ann = read_annotation(anno_path)
    found = len(set(ann.chromosome.values()))
    if found > max_chromosomes:  # each is a piece and an open file while splitting
        raise InputError(str(anno_path), f"names {found:,d} chromosomes; at most "
                         f"{max_chromosomes:,d} (max_chromosomes)")
    out_dir.mkdir(parents=True, exist_ok=True)
    handles: dict[str, io.TextIOBase] = {}
    matrices: dict[str, NpyRows] = {}
    anno_lines: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    width = -1
    try:
        for number, text in lines(geno):
            parts = geno_fields(text)
            if width < 0:
                width = len(parts)
                if width < 4:
                    raise InputError(str(geno), "expected 'rs, allele1, allele0, g1, ...'",
                                     number)
            elif len(parts) != width:
                raise InputError(str(geno), f"has {len(parts) - 3} genotypes, the first row "
                                 f"has {width - 3} (ragged rows)", number)
            rs = parts[0]
            chrom = ann.chromosome.get(rs)
            if chrom is None:
                raise InputError(str(geno), f"SNP {rs!r} is not in the annotation file "
                                 f"{anno_path}", number)
            row = _numeric(parts[3:], geno, number, 4)
            if chrom not in handles:
                handles[chrom] = open(out_dir / f"geno.{chrom}.txt", "w")
                matrices[chrom] = NpyRows(out_dir / f"geno.{chrom}.npy", width - 3)
                anno_lines[chrom] = []
                counts[chrom] = 0
            handles[chrom].write(text + "\n")
            matrices[chrom].append(row)
            anno_lines[chrom].append(f"{rs}\t{ann.position[rs]}\t{chrom}\n")
            counts[chrom] += 1
    finally:
        for h in handles.values():
            h.close()
        for m in matrices.values():
            m.close()
    if width < 0:
        raise InputError(str(geno), "the genotype file is empty")
    chromosomes: dict[str, dict[str, object]] = {}
    for chrom, rows in anno_lines.items():
        anno_file = out_dir / f"anno.{chrom}.txt"
        anno_file.write_text("".join(rows))
        chromosomes[chrom] = {"geno": out_dir / f"geno.{chrom}.txt", "anno": anno_file,
                              "matrix": out_dir / f"geno.{chrom}.npy", "snps": counts[chrom]}
    return Split(individuals=width - 3, snps=sum(counts.values()), chromosomes=chromosomes)


def read_table(path: Path, what: str) -> list[list[str]]:
    """Whitespace-separated rows (phenotypes, covariates), numbers or NA, checked."""
    rows = []
    for number, text in lines(path):
        parts = text.replace(",", " ").split()
        _numeric(parts, path, number, 1)
        rows.append(parts)
    if not rows:
        raise InputError(str(path), f"the {what} file is empty")
    return rows


def check_phenotypes(path: Path, individuals: int, column: int) -> list[str]:
    """The chosen phenotype column, one value per individual; all-NA is refused."""
    rows = read_table(path, "phenotype")
    if len(rows) != individuals:
        raise InputError(str(path), f"has {len(rows)} rows but the genotype file has "
                         f"{individuals} individuals (one row per individual, in order)")
    values = []
    for number, row in enumerate(rows, start=1):
        if column > len(row):
            raise InputError(str(path), f"has {len(row)} columns; -n {column} asks for "
                             f"column {column}", number)
        values.append(row[column - 1])
    if all(v == MISSING for v in values):
        raise InputError(str(path), f"phenotype column {column} is NA for every individual")
    return values


def check_covariates(path: Path, individuals: int) -> list[list[str]]:
    rows = read_table(path, "covariate")
    if len(rows) != individuals:
        raise InputError(str(path), f"has {len(rows)} rows but the genotype file has "
                         f"{individuals} individuals")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise InputError(str(path), f"rows have different numbers of columns: {sorted(widths)}")
    return rows
