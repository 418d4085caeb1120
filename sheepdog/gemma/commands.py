"""GEMMA's command lines, its version, and what its logs say (pure helpers)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..process import capture

LMM_MODES = (1, 2, 3, 4, 9)
COMPLETE = "total computation time"
# GEMMA runs with its default threading, as a user's plain GEMMA run does: its
# results depend on the OpenBLAS thread count (measured on BXD with covariates: one
# thread changes p_lrt in the 7th digit for 5 of 7,317 SNPs), and exact is the point.
# OpenBLAS's idle threads spin for 2^28 cycles before sleeping: with two GEMMAs on two
# cores that doubled each run's CPU time. 2^4 cycles changes no result (same threads,
# same partition of the work; the BXD output is byte for byte the same).
GEMMA_ENV: dict[str, str] = {"OPENBLAS_THREAD_TIMEOUT": "4"}
# GEMMA zeroes a fresh batch buffer of ~10 MB per run: as 4 KiB pages that is half a
# short run's system time (perf, BXD chromosome 1 cut to 67 strains). With this, glibc
# (>= 2.35; older ones ignore it) asks for transparent huge pages where the kernel
# allows them (`madvise`): a precompute's many short runs took 15-20% less, with
# byte-identical output. Full-size LOCO runs showed no gain, so only precompute uses it.
SHORT_RUN_ENV: dict[str, str] = {**GEMMA_ENV, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
# Permutation batches are throughput work: one OpenBLAS thread per GEMMA, one batch
# per core, no oversubscription. Their minima equal a direct GEMMA run made with the
# same setting (the test does exactly that).
PERMUTATION_ENV = {"OPENBLAS_NUM_THREADS": "1"}


def version(binary: str = "gemma", cache_dir: Path | None = None) -> str:
    """GEMMA's version, e.g. '0.98.5 (2021-08-25)'; part of every cache key.

    Remembered per binary (path, size, mtime) in cache_dir, so a fully cached run starts
    no GEMMA process at all.
    """
    path = shutil.which(binary)
    if path is None:
        raise ConfigError(f"GEMMA ({binary!r}) is not installed here: apt-get install gemma, "
                          "or guix install gemma (see guix/manifest.scm)")
    real = os.path.realpath(path)
    st = os.stat(real)
    memo = None
    if cache_dir is not None:
        tag = hashlib.sha256(f"{real}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
        memo = cache_dir / f"gemma-version.{tag}"
        if memo.exists():
            return memo.read_text()
    found = _probe(path)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(found)
    return found


@lru_cache(maxsize=4)
def _probe(path: str) -> str:
    out = capture([path], timeout=30)[1]
    found = re.search(r"GEMMA\s+(\S+(?:\s+\([0-9-]+\))?)", out)
    if not found:
        raise ConfigError(f"{path} did not print a GEMMA version line")
    return found.group(1)


# GEMMA flags that would break the split, each with what to do instead
REFUSED_FLAGS = {
    "-loco": "sheepdog splits the scan by chromosome itself",
    "-o": "sheepdog names the outputs (use --out for the merged result)",
    "-outdir": "sheepdog names the outputs (use --out for the merged result)",
    "-k": "sheepdog computes each chromosome's LOCO kinship",
    "-gk": "sheepdog computes the kinship pieces",
    "-ks": "sheepdog computes the kinship pieces",
    "-g": "give the genotypes as -g", "-p": "give the phenotypes as -p",
    "-a": "give the annotation as -a", "-c": "give the covariates as -c",
    "-n": "give the phenotype column as -n", "-lmm": "use --lmm",
    "-bfile": "PLINK input is not supported: use BIMBAM (or GN .geno / R/qtl2)",
    "-eigen": "the eigen decomposition is per LOCO kinship, inside each piece",
    "-d": "the eigen decomposition is per LOCO kinship, inside each piece",
    "-u": "the eigen decomposition is per LOCO kinship, inside each piece",
    "-predict": "prediction is not a LOCO scan", "-bslmm": "BSLMM is not a LOCO scan",
    "-vc": "variance components are not a LOCO scan", "-gxe": "GxE is not supported yet",
}


# The GEMMA flags a request may add to its LMM pieces, by allow list: none names a file
# (a flag that did, like -snps FILE, would open a server path) or changes the analysis
# into one sheepdog does not split. Each of these takes one number...
NUMBER_FLAGS = frozenset({"-miss", "-hwe", "-r2", "-lmin", "-lmax", "-region", "-pnr",
                          "-emi", "-nri", "-emp", "-nrp"})
# ... and each of these none.
SWITCH_FLAGS = frozenset({"-notsnp", "-crt", "-check", "-no-check", "-no-fpe-check",
                          "-strict", "-silence", "-debug", "-legacy"})


def _number(word: str) -> bool:
    try:
        return math.isfinite(float(word))
    except ValueError:
        return False


def check_gemma_flags(flags: list[str], declared: dict[str, str] | None = None) -> list[str]:
    """Extra GEMMA flags for the LMM pieces, by allow list; ConfigError names the first
    that is not allowed and says what to do instead. `declared`: GEMMA flags the request
    has as parameters -> how to give them (e.g. -maf -> use --maf)."""
    i = 0
    while i < len(flags):
        word = flags[i]
        if not isinstance(word, str) or "\0" in word or "\n" in word:
            raise ConfigError(f"GEMMA flag {word!r} is not a plain word")
        if word in SWITCH_FLAGS:
            i += 1
            continue
        if word in NUMBER_FLAGS:
            value = flags[i + 1] if i + 1 < len(flags) else None
            if not isinstance(value, str) or not _number(value):
                raise ConfigError(f"GEMMA flag {word} takes a number, got {value!r}")
            i += 2
            continue
        reason = (declared or {}).get(word) or REFUSED_FLAGS.get(word) or (
            "not among the flags a scan may pass on to GEMMA: "
            f"{' '.join(sorted(NUMBER_FLAGS))} (each with a number), "
            f"{' '.join(sorted(SWITCH_FLAGS))}")
        raise ConfigError(f"GEMMA flag {word[:80]} is not allowed here: {reason}")
    return list(flags)


def lmm_argv(geno: Any, pheno: Any, anno: Any, kinship: Any, lmm: int, declared: list[str],
             covariates: Any = None, column: int | None = None,
             extra: list[str] | None = None) -> list[Any]:
    """The LMM of one chromosome's SNPs against its LOCO kinship; `declared`: the
    request's parameters that are GEMMA flags (Params.gemma_flags)."""
    argv: list[Any] = ["gemma", "-g", geno, "-p", pheno, "-a", anno, "-k", kinship,
                       "-lmm", str(lmm), *declared]
    if covariates is not None:
        argv += ["-c", covariates]
    if column is not None:
        argv += ["-n", str(column)]
    return argv + list(extra or []) + ["-outdir", "output", "-o", "lmm"]


_LOG_FIELDS = {
    "version": r"##\s*GEMMA Version\s*=\s*(.+)",
    "individuals": r"##\s*number of analyzed individuals\s*=\s*(\d+)",
    "total_individuals": r"##\s*number of total individuals\s*=\s*(\d+)",
    "snps": r"##\s*number of analyzed SNPs(?:/var)?\s*=\s*(\d+)",
    "total_snps": r"##\s*number of total SNPs(?:/var)?\s*=\s*(\d+)",
    "pve": r"##\s*pve estimate in the null model\s*=\s*(\S+)",
    "vg": r"##\s*vg estimate in the null model\s*=\s*(\S+)",
    "ve": r"##\s*ve estimate in the null model\s*=\s*(\S+)",
}


def parse_log(text: str) -> dict[str, str]:
    """The '##' facts of a GEMMA log that gathering and result.json need."""
    found: dict[str, str] = {}
    for name, pattern in _LOG_FIELDS.items():
        m = re.search(pattern, text)
        if m:
            found[name] = m.group(1).strip()
    found["complete"] = "1" if COMPLETE in text else "0"
    return found


def p_value(text: str) -> float | None:
    """A p GEMMA printed, or None where it printed no usable one: `nan`, `-nan`, `inf`
    (a SNP whose test failed) are missing values, never the strongest signal. A p that
    underflowed to 0 stays 0."""
    try:
        p = float(text)
    except ValueError:
        return None
    return p if 0.0 <= p <= 1.0 else None


def minus_log10(p: float, floor: float) -> float:
    """-log10 p, with `floor` standing for a p printed as 0."""
    return -math.log10(p) if p > 0 else floor


def p_column(header: list[str]) -> str:
    """The p-value column of an assoc file for the LMM mode that wrote it."""
    for name in ("p_lrt", "p_wald", "p_score"):
        if name in header:
            return name
    raise ConfigError(f"no p-value column in GEMMA output header {header}")
