"""Centered kinship as GEMMA's `-gk 1` computes it (BimbamKin).

GEMMA (after ReadFile_geno's SNP filters) keeps a SNP when at most 5% of its genotypes
are missing, its minor allele frequency is at least 0.01 and it is polymorphic; it fills
missing genotypes with the SNP's mean and centres each SNP. It then copies the kept SNPs,
in file order, into a buffer of K_BATCH_SIZE columns and adds buffer x bufferᵀ to K with
one cblas_dgemm per full buffer and one for the rest, and scales K by 1/(SNPs kept).
Kinship is computed over every individual, so it does not depend on the phenotype.

A kinship piece keeps one chromosome's centred SNPs; a LOCO kinship feeds every other
chromosome's through the same batches and the same BLAS call (see blas.py), which gives
GEMMA's numbers to the last bit rather than to the last few. Tests compare them with
GEMMA's own `-gk 1 -loco c` output, digit for digit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..formats.bimbam import MISSING, geno_fields, lines
from .blas import Blas

MISS_LEVEL = 0.05
MAF_LEVEL = 0.01


BLOCK = 1024  # SNPs at a time: bounded memory (BXD chromosomes fit in one block)
BATCH = 20000  # GEMMA 0.98's K_BATCH_SIZE: SNPs per cblas_dgemm
# GEMMA's last, partial batch is padded with zero columns to BATCH. Zeros after the data
# change no sum, but where the data ends inside a BLAS's blocks of the inner dimension
# does (OpenBLAS evens out its last two blocks), so that is kept: the data is followed
# by at least PAD zero columns, twice the largest such block (GEMM_Q) of any OpenBLAS
# kernel. OpenBLAS also picks its thread count by n² x width (and threads change the
# sums): below THREADED a product keeps GEMMA's full width, so it gets GEMMA's threads.
PAD = 2048
THREADED = 1 << 26  # n² x width from which OpenBLAS uses all of up to 256 threads


def read_genotypes(path: Path) -> np.ndarray:
    """SNPs x individuals, NaN where the file says NA (the file was validated before):
    the split's .npy matrix (mapped, read block by block), or a BIMBAM text file."""
    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            return np.load(path, mmap_mode="r")
    rows = [",".join(geno_fields(text)[3:]) for _, text in lines(path)]
    if not rows:
        return np.zeros((0, 0))
    values = np.array(",".join(rows).replace(MISSING, "nan").split(","), dtype=np.float64)
    return values.reshape(len(rows), -1)


def _centred_block(block: np.ndarray) -> np.ndarray:
    """The SNPs of a block that GEMMA keeps, mean-filled and centred; the mean summed
    individual by individual, as GEMMA sums it (cumsum adds in order; sum pairs up)."""
    n = block.shape[1]
    missing = np.isnan(block)
    n_miss = missing.sum(axis=1)
    present = n - n_miss
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.cumsum(np.where(missing, 0.0, block), axis=1)[:, -1] if n else 0.0 * n_miss
        mean = total / present
        freq = mean / 2.0
        lo = np.where(missing, np.inf, block).min(axis=1)
        hi = np.where(missing, -np.inf, block).max(axis=1)
    keep = ((n_miss / n) <= MISS_LEVEL) & (freq >= MAF_LEVEL) & (freq <= 1.0 - MAF_LEVEL) \
        & (present > 0) & (lo != hi)
    x = block[keep]
    return np.where(np.isnan(x), mean[keep, None], x) - mean[keep, None]


def centred(genotypes: np.ndarray) -> np.ndarray:
    """The SNPs GEMMA keeps of a SNPs x individuals matrix, centred (kept SNPs x
    individuals), BLOCK SNPs at a time."""
    parts = [_centred_block(np.asarray(genotypes[s:s + BLOCK], dtype=np.float64))
             for s in range(0, genotypes.shape[0], BLOCK)]
    return np.concatenate(parts) if parts else np.zeros((0, genotypes.shape[1]))


def _width(n: int, used: int) -> int:
    """Columns of the product for `used` SNPs in a batch: GEMMA's BATCH, or fewer with
    the same sums (see PAD)."""
    width = min(BATCH, used + PAD)
    return width if n * n * width >= THREADED else BATCH


def gemma_kinship(pieces: Iterable[np.ndarray], n: int, blas: Blas,
                  total: int | None = None) -> tuple[np.ndarray, int]:
    """(K, SNPs used) of centred SNPs x individuals pieces taken in order, batch by batch
    as GEMMA does; K is all zeros when no SNP is left. `total`: the pieces' SNPs, if
    known: when they fit in one batch, the buffer is only as wide as its one product
    (BXD: 15 MB, not 32 MB and a copy, for every LOCO kinship)."""
    k = np.zeros((n, n))
    buffer = np.zeros((n, _width(n, total) if total is not None and total < BATCH else BATCH))
    used = filled = 0
    for piece in pieces:
        at = 0
        while at < len(piece):
            take = min(BATCH - filled, len(piece) - at)
            buffer[:, filled:filled + take] = piece[at:at + take].T
            filled, at = filled + take, at + take
            if filled == BATCH:
                blas.add_product(buffer, k)
                used, filled = used + BATCH, 0
    if filled:
        width = _width(n, filled)
        last = buffer if buffer.shape[1] == width else np.ascontiguousarray(buffer[:, :width])
        last[:, filled:] = 0.0
        blas.add_product(last, k)
        used += filled
    if used:
        k *= 1.0 / used  # gsl_matrix_scale(K, 1.0 / ns_test)
    return k, used


def write(out: Path, x: np.ndarray, individuals: int, rank: int) -> None:
    np.save(out / "centred.npy", x)
    (out / "kinship.json").write_text(json.dumps({"snps": len(x), "individuals": individuals,
                                                  "rank": rank}))


def read(directory: Path) -> np.ndarray:
    """A piece's centred SNPs, mapped (a LOCO kinship copies them into its batch)."""
    return np.load(directory / "centred.npy", mmap_mode="r")


def meta(directory: Path) -> dict[str, int]:
    """A piece's {"snps", "individuals", "rank"}: rank orders the pieces as the file does."""
    return {k: int(v) for k, v in json.loads((directory / "kinship.json").read_text()).items()}
