"""GN .geno and R/qtl2 copies of the bundled BXD data, for tests and benchmarks.

The BIMBAM file has no individual ids: the copies name them BXD_1..BXD_198 in column
order, and write the phenotypes keyed by those ids in a shuffled order, so a result
equal to the BIMBAM run's shows the match is by id, not by position.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "sheepdog" / "examples" / "bxd"
LETTER = {"1": "B", "0": "D", "0.5": "H", "NA": "U"}


def bimbam_rows() -> list[list[str]]:
    with gzip.open(EXAMPLE / "BXD_geno.txt.gz", "rt") as f:
        return [[c.strip() for c in line.split(",")] for line in f if line.strip()]


def annotation() -> dict[str, tuple[str, str]]:
    out = {}
    for line in (EXAMPLE / "BXD_snps.txt").read_text().splitlines():
        rs, pos, chrom = line.split()[:3]
        out[rs] = (pos, chrom)
    return out


def ids(count: int) -> list[str]:
    return [f"BXD_{i + 1}" for i in range(count)]


def write_pheno(path: Path, names: list[str], sep: str = "\t", seed: int = 1) -> Path:
    """BXD_pheno.txt as an id-keyed table, rows shuffled."""
    values = (EXAMPLE / "BXD_pheno.txt").read_text().split()
    rows = list(zip(names, values, strict=True))
    random.Random(seed).shuffle(rows)
    path.write_text(f"id{sep}trait\n" + "".join(f"{i}{sep}{v}\n" for i, v in rows))
    return path


def write_geno(folder: Path) -> tuple[Path, Path]:
    """(BXD.geno, traits.tsv)."""
    rows, ann = bimbam_rows(), annotation()
    names = ids(len(rows[0]) - 3)
    lines = ["# BXD from GEMMA's example, as a GN .geno file", "@name:BXD", "@type:riset",
             "@mat:B", "@pat:D", "@het:H", "@unk:U",
             "\t".join(["Chr", "Locus", "cM", "Mb", *names])]
    for row in rows:
        pos, chrom = ann[row[0]]
        mb = f"{int(pos) / 1e6:.6f}"
        lines.append("\t".join([chrom, row[0], "0", mb, *(LETTER[g] for g in row[3:])]))
    geno = folder / "BXD.geno"
    geno.write_text("\n".join(lines) + "\n")
    return geno, write_pheno(folder / "traits.tsv", names)


def write_qtl2(folder: Path) -> Path:
    """bxd.json naming transposed genotypes, a physical map and id-keyed phenotypes.

    GEMMA's BXD has heterozygous calls (0.5), which an RI cross cannot code in R/qtl2:
    the copy says `f2` (A/H/B as 1/2/3) to keep every call."""
    rows, ann = bimbam_rows(), annotation()
    names = ids(len(rows[0]) - 3)
    code = {"1": "B", "0.5": "H", "0": "D", "NA": "-"}
    (folder / "geno.csv").write_text(
        ",".join(["marker", *names]) + "\n"
        + "".join(",".join([r[0], *(code[g] for g in r[3:])]) + "\n" for r in rows))
    (folder / "pmap.csv").write_text(
        "marker,chr,pos\n"
        + "".join(f"{r[0]},{ann[r[0]][1]},{int(ann[r[0]][0]) / 1e6:.6f}\n" for r in rows))
    write_pheno(folder / "pheno.csv", names, sep=",")
    control = {"crosstype": "f2", "geno": "geno.csv", "pheno": "pheno.csv",
               "pmap": "pmap.csv", "alleles": ["B", "D"], "genotypes": {"B": 1, "H": 2, "D": 3},
               "na.strings": ["-", "NA"], "geno_transposed": True}
    path = folder / "bxd.json"
    path.write_text(json.dumps(control, indent=1))
    return path
