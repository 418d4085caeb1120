"""The pieces of a precompute, run as task steps (see ops.py):

    pc-prepare CHR GENO ANNO KINSHIP_DIR ...      LOCO kinship files and the SNP table,
                                                  once per genotype set
    pc-batch --prepared DIR --traits FILE ... -- CHR GENO ANNO MATRIX ...
                                                  GEMMA's LOCO LMM for a batch of traits

A batch runs GEMMA per trait and chromosome, as a serial `gemma -loco` does, but tests
each distinct genotype pattern among the trait's measured individuals once: GEMMA tests
SNPs independently (same genotypes, same statistics), and GN's traits are mostly
measured on a subset of strains, where many SNPs coincide. Traits measured on the same
individuals share the cut files. The results are expanded back to every SNP.

Only the standard library and numpy: this code runs on hosts that have nothing else.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SheepdogError
from ...process import capture
from ..commands import SHORT_RUN_ENV, lmm_argv, minus_log10, p_value, parse_log
from ..formats.bimbam import geno_fields, lines
from ..scan.blas import gemmas
from ..scan.loco import kinship_of, read_matrix, write_matrix

Emit = Callable[[str], None]
# one SNP of a trait's vector: -log10 p signed by the effect's direction, and the rest
# (l_mle too: gemma2lmdb's records carry it). A change here changes every trait's key.
VECTOR = np.dtype([("logp", "<f4"), ("beta", "<f4"), ("se", "<f4"), ("af", "<f4"),
                   ("p", "<f8"), ("l_mle", "<f4")])
SNPS = np.dtype([("rs", "U64"), ("chr", "U8"), ("ps", "<i8")])
P_COLUMNS = {"lrt": "p_lrt", "wald": "p_wald", "score": "p_score"}
FLOOR = 300.0  # -log10 of a p GEMMA printed as 0


def prepare(items: list[str], here: Path, emit: Emit) -> None:
    """Per chromosome its LOCO kinship as GEMMA reads it; the SNP table in vector order."""
    quads = [items[i:i + 4] for i in range(0, len(items), 4)]
    dirs = {q[0]: Path(q[3]) for q in quads}
    rows: list[tuple[str, str, int]] = []
    counts = {}
    blas = gemmas()
    for chrom, _geno, anno, _kin in quads:
        matrix = kinship_of(dirs, chrom, blas)  # one at a time, as loco-lmm computes them
        write_matrix(here / f"kin.{chrom}.txt", matrix)
        before = len(rows)
        for _, text in lines(Path(anno)):
            rs, pos, c = text.split("\t")[:3]
            rows.append((rs, c, int(pos)))
        counts[chrom] = len(rows) - before
    np.save(here / "snps.npy", np.array(rows, dtype=SNPS))
    (here / "meta.json").write_text(json.dumps({"chromosomes": list(counts),
                                                "snps": counts}))
    emit(f"LOCO kinships of {len(counts)} chromosomes by {blas.why}; {len(rows):,d} SNPs")


@dataclass
class Chromosome:
    name: str
    geno: Path  # BIMBAM text, the split's
    anno: Path
    matrix: Path  # .npy, SNPs x individuals
    kinship: Path  # LOCO, text


def _cut(chrom: Chromosome, measured: np.ndarray, work: Path) -> tuple[Path, Path, Path,
                                                                      np.ndarray, list[str]]:
    """GEMMA's inputs cut to the measured individuals (GEMMA drops the others itself, so
    the numbers are the same, and it reads a third of the text), with one SNP per
    distinct genotype pattern among them: (geno, anno, kinship), each SNP's pattern
    number, and the kept SNPs' names in file order."""
    matrix = np.load(chrom.matrix, mmap_mode="r")
    _, first, pattern = np.unique(np.ascontiguousarray(matrix[:, measured]), axis=0,
                                  return_index=True, return_inverse=True)
    keep = np.sort(first)
    renumber = np.empty(len(first), dtype=np.int64)
    renumber[np.argsort(first)] = np.arange(len(first))  # pattern -> position in keep
    wanted = set(keep.tolist())
    columns = (measured + 3).tolist()
    geno, anno = work / f"g.{chrom.name}", work / f"a.{chrom.name}"
    kinship = work / f"k.{chrom.name}"
    names = []
    with open(geno, "w") as g:
        for i, (_, text) in enumerate(lines(chrom.geno)):
            if i in wanted:
                cells = geno_fields(text)
                g.write(", ".join(cells[:3] + [cells[j] for j in columns]) + "\n")
                names.append(cells[0])
    with open(anno, "w") as a:
        for i, (_, text) in enumerate(lines(chrom.anno)):
            if i in wanted:
                a.write(text + "\n")
    # the same decimal text for every kept entry: GEMMA reads the very same numbers
    write_matrix(kinship, read_matrix(chrom.kinship)[np.ix_(measured, measured)])
    return geno, anno, kinship, renumber[np.asarray(pattern).reshape(-1)], names


def _cut_rows(path: Path | None, measured: np.ndarray, out: Path) -> Path | None:
    """A covariate file's rows of the measured individuals."""
    if path is None:
        return None
    rows = [text for _, text in lines(path)]
    out.write_text("".join(rows[i] + "\n" for i in measured.tolist()))
    return out


@dataclass
class Options:
    test: str
    threshold: float
    covariates: Path | None
    extra: list[str]


def _read_assoc(path: Path, column: str) -> dict[str, tuple[float, ...]]:
    """rs -> (p, beta, se, af, l_mle) as GEMMA printed them; a SNP whose p GEMMA printed
    as `nan` or `inf` is left out, as one it did not test (missing, never a peak)."""
    out = {}
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        at = [header.index(c) for c in (column, "beta", "se", "af")]
        l_mle = header.index("l_mle") if "l_mle" in header else None
        rs = header.index("rs")
        for line in f:
            cols = line.rstrip("\n").split("\t")
            p = p_value(cols[at[0]])
            if p is not None:
                out[cols[rs]] = (p, *(float(cols[i]) for i in at[1:]),
                                 float(cols[l_mle]) if l_mle is not None else math.nan)
    return out


def _gemma(argv: list[str], work: Path, stop: threading.Event | None) -> tuple[int, str]:
    code, out, _ = capture(argv, work, _ENV, together=True, stop=stop)
    if code == -1:
        raise SheepdogError("cancelled")
    return code, out


_ENV = dict(os.environ, **SHORT_RUN_ENV)


Cut = tuple[Chromosome, Path, Path, Path, np.ndarray, list[str]]


def _rows(found: dict[str, tuple[float, ...]], names: list[str]) -> np.ndarray:
    """One row of the vector's fields per SNP of a chromosome (NaN where GEMMA gave no p)."""
    kept = np.full((len(names), len(VECTOR.names or ())), np.nan)
    for i, rs in enumerate(names):
        row = found.get(rs)
        if row is not None:
            p, beta, se, af, l_mle = row
            kept[i] = (math.copysign(minus_log10(p, FLOOR), beta), beta, se, af, p, l_mle)
    return kept


def scan_trait(values: list[str], chromosomes: list[Cut], total: int, options: Options,
               covariates: Path | None, work: Path, stop: threading.Event | None
               ) -> tuple[np.ndarray, dict[str, Any]]:
    """One trait's LOCO scan (values of the measured individuals, in the cut files'
    order): its vector over every SNP and what GEMMA's log says."""
    pheno = work / "pheno.txt"
    pheno.write_text("".join(v + "\n" for v in values))
    vector = np.zeros(total, dtype=VECTOR)
    vector[:] = (np.nan,) * len(VECTOR.names or ())
    facts: dict[str, Any] = {}
    offset = 0
    for chrom, geno, anno, cut_kinship, pattern, names in chromosomes:
        if stop is not None and stop.is_set():
            raise SheepdogError("cancelled")
        argv = lmm_argv(str(geno), str(pheno), str(anno), str(cut_kinship), 9, [],
                        str(covariates) if covariates else None, extra=options.extra)
        argv[argv.index("-o") + 1] = "t"
        code, out = _gemma(argv, work, stop)
        if code != 0:
            problem = next((ln for ln in out.splitlines() if "ERROR" in ln), out[-300:])
            raise SheepdogError(f"GEMMA failed on chromosome {chrom.name}: {problem.strip()}")
        found = _read_assoc(work / "output" / "t.assoc.txt", P_COLUMNS[options.test])
        if not facts:
            facts = parse_log((work / "output" / "t.log.txt").read_text(errors="replace"))
        rows = _rows(found, names)[pattern]
        part = vector[offset:offset + len(pattern)]
        for j, name in enumerate(VECTOR.names or ()):
            part[name] = rows[:, j]
        offset += len(pattern)
    return vector, facts


def peaks(vector: np.ndarray, snps: np.ndarray, threshold: float) -> tuple[list[dict[str, Any]],
                                                                           dict[str, Any] | None]:
    """(the top SNP of each chromosome at or above the threshold, the genome-wide top)."""
    strength = np.abs(vector["logp"].astype(np.float64))
    strength[np.isnan(strength)] = -1.0
    found = []
    top: dict[str, Any] | None = None
    for chrom in dict.fromkeys(snps["chr"].tolist()):
        idx = np.flatnonzero(snps["chr"] == chrom)
        best = int(idx[np.argmax(strength[idx])])
        if strength[best] < 0:
            continue
        hit: dict[str, Any] = {"locus": str(snps["rs"][best]), "chr": str(chrom),
               "mb": float(snps["ps"][best]) / 1e6, "logp": float(strength[best]),
               "effect": float(vector["beta"][best]), "p": float(vector["p"][best])}
        if top is None or hit["logp"] > top["logp"]:
            top = hit
        if hit["logp"] >= threshold:
            found.append(hit)
    return found, top


def batch(args: Any, here: Path, emit: Emit, stop: threading.Event | None) -> None:
    """GEMMA's LOCO LMM for every trait of the batch: vectors.npy (traits x SNPs) and
    batch.json (each trait's status, peaks and facts). A trait GEMMA refuses is recorded
    as failed with GEMMA's reason; the others go on."""
    prepared = Path(args.prepared)
    spec = json.loads(Path(args.traits).read_text())
    snps = np.load(prepared / "snps.npy")
    items = args.items
    chroms = [Chromosome(items[i], Path(items[i + 1]), Path(items[i + 2]), Path(items[i + 3]),
                         prepared / f"kin.{items[i]}.txt") for i in range(0, len(items), 4)]
    options = Options(args.test, args.threshold,
                      Path(args.covariates) if args.covariates else None,
                      json.loads(args.gemma_flags))
    vectors = np.zeros((len(spec["keys"]), len(snps)), dtype=VECTOR)
    records: list[dict[str, Any]] = [{} for _ in spec["keys"]]
    groups: dict[tuple[bool, ...], list[int]] = {}
    for t, values in enumerate(spec["values"]):
        groups.setdefault(tuple(v != "NA" for v in values), []).append(t)
    with tempfile.TemporaryDirectory(dir=here.resolve()) as tmp:
        work = Path(tmp)
        for mask, members in groups.items():
            measured = np.flatnonzero(np.array(mask))
            cut: list[Cut] = [(c, *_cut(c, measured, work)) for c in chroms]
            covariates = _cut_rows(options.covariates, measured, work / "covariates.txt")
            for t in members:
                records[t] = _one(spec, t, cut, len(snps), options, covariates, work, stop,
                                  snps, vectors, emit)
    np.save(here / "vectors.npy", vectors)
    (here / "batch.json").write_text(json.dumps({"traits": records}))


def _one(spec: dict[str, Any], t: int, cut: list[Cut], total: int, options: Options,
         covariates: Path | None, work: Path, stop: threading.Event | None, snps: np.ndarray,
         vectors: np.ndarray, emit: Emit) -> dict[str, Any]:
    trait, key = spec["ids"][t], spec["keys"][t]
    started = time.time()
    record: dict[str, Any] = {"id": trait, "key": key, "started": started,
                              "host": socket.gethostname()}
    try:
        measured = [v for v in spec["values"][t] if v != "NA"]
        vector, facts = scan_trait(measured, cut, total, options, covariates, work, stop)
    except SheepdogError as e:
        if stop is not None and stop.is_set():
            raise
        emit(f"trait {trait}: failed: {e}")
        return {**record, "status": "failed", "reason": str(e), "finished": time.time()}
    vectors[t] = vector
    found, top = peaks(vector, snps, options.threshold)
    record.update(status="done", n=int(facts.get("individuals", 0)), peaks=found, top=top,
                  pve=facts.get("pve"), vg=facts.get("vg"), ve=facts.get("ve"),
                  finished=time.time())
    emit(f"trait {trait}: n {record['n']}, " + (
        f"top {top['locus']} chr {top['chr']} -log10 p {top['logp']:.2f}" if top else
        "no SNP tested") + f" ({record['finished'] - started:.2f} s)")
    return record


def summary(items: list[str], here: Path, emit: Emit) -> None:
    """The batches' counts (the dataset's store is written by the workflow's finalize)."""
    meta = json.loads(Path(items[0]).read_text())
    counts: dict[str, int] = {}
    for path in items[1:]:
        for record in json.loads(Path(path).read_text())["traits"]:
            counts[record["status"]] = counts.get(record["status"], 0) + 1
    (here / "summary.json").write_text(json.dumps({"snps": sum(meta["snps"].values()),
                                                   "scanned": counts}))
    emit(f"{sum(counts.values())} traits scanned in {len(items) - 1} batches: "
         + (", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none to run"))
