"""LOCO and whole-genome kinships from the kinship pieces, as GEMMA computes them.

GEMMA's `-gk 1 -loco c` is the centered kinship of every SNP not on chromosome c, in
file order; without -loco, of every SNP. The pieces hold each chromosome's centred SNPs,
so a LOCO kinship is one pass of GEMMA's batched product over the other pieces (see
kinship.py) instead of a GEMMA run that reads and filters the whole genotype file again.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import GatherError
from . import kinship
from .blas import Blas


def read_matrix(path: Path) -> np.ndarray:
    values = np.array(path.read_text().split(), dtype=np.float64)
    n = int(round(len(values) ** 0.5))
    if n * n != len(values):
        raise GatherError(f"{path}: {len(values)} numbers is not a square kinship matrix")
    return values.reshape(n, n)


def write_matrix(path: Path, matrix: np.ndarray) -> None:
    # 10 significant digits, as GEMMA writes its own kinship: GEMMA's `-lmm -loco c`
    # then reads the very numbers it would have read from its own file
    row = "\t".join(["%.10g"] * matrix.shape[1]) + "\n"
    with open(path, "w") as f:  # a quarter faster than np.savetxt, still row by row
        f.writelines(row % tuple(r.tolist()) for r in matrix)


def kinship_of(pieces: dict[str, Path], leave_out: str | None, blas: Blas) -> np.ndarray:
    """The kinship of every piece's SNPs but `leave_out`'s (None: of all), the pieces
    taken in the genotype file's order."""
    if leave_out is not None:
        if len(pieces) < 2:
            raise GatherError("LOCO needs at least two chromosomes")
        if leave_out not in pieces:
            raise GatherError(f"no kinship for chromosome {leave_out}")
    metas = {c: kinship.meta(d) for c, d in pieces.items()}
    sizes = {m["individuals"] for m in metas.values()}
    if len(sizes) > 1:
        raise GatherError("kinship pieces differ in individuals: " + ", ".join(
            f"chr {c} {m['individuals']}" for c, m in metas.items()))
    order = sorted((c for c in pieces if c != leave_out), key=lambda c: metas[c]["rank"])
    matrix, used = kinship.gemma_kinship((kinship.read(pieces[c]) for c in order),
                                         sizes.pop() if sizes else 0, blas,
                                         sum(metas[c]["snps"] for c in order))
    if used == 0:
        what = f"the LOCO kinship of chromosome {leave_out}" if leave_out else "the kinship"
        raise GatherError(f"no SNPs left for {what}")
    return matrix
