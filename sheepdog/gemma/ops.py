"""The Python steps of the GEMMA workflows, run as task processes:

    python -m sheepdog.gemma.ops kinship [--rank N] GENO
    python -m sheepdog.gemma.ops loco-lmm --chromosome C -- GEMMA-ARGS -- CHR KINSHIP_DIR ...
    python -m sheepdog.gemma.ops loco-lmm --full [--part GENO ANNO ...] -- GEMMA-ARGS --
                                          CHR KINSHIP_DIR ...
    python -m sheepdog.gemma.ops gather CHR ASSOC LOG [...]
    python -m sheepdog.gemma.ops perm-prepare --pheno P [--column N] [--covariates C]
                                               CHR GENO ANNO KINSHIP_DIR [...]
    python -m sheepdog.gemma.ops perm-batch --prepared DIR --seed S --first I --count K
                                             --total N --lmm L [--maf M]
    python -m sheepdog.gemma.ops perm-gather BATCH_JSON [...]
    python -m sheepdog.gemma.ops pc-prepare CHR GENO ANNO KINSHIP_DIR [...]
    python -m sheepdog.gemma.ops pc-batch --prepared DIR --traits JSON --test T [--maf M]
                                          [--covariates C] -- CHR GENO ANNO MATRIX [...]

Each writes its outputs into its working directory (the task's scratch). The local
backend calls main() in-process with that directory for the operations in IN_PROCESS;
elsewhere it runs as a process. Only the standard library, numpy and Pillow may be
imported from here: this code runs on hosts whose Python has nothing else.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..defaults import WATCH_POLL
from ..errors import DiskFull, SheepdogError, is_disk_full
from ..process import Process
from .commands import GEMMA_ENV
from .formats.bimbam import check_covariates, read_table
from .precompute import steps as pcsteps
from .scan import kinship, loco, merge, permute
from .scan.blas import gemmas as gemmas_blas

# short steps, run on a worker thread by the local backend (see backends/local.py)
IN_PROCESS = frozenset({"kinship", "loco-lmm", "gather", "perm-prepare", "perm-gather",
                        "pc-prepare", "pc-batch", "pc-summary"})


def _triples(items: list[str]) -> list[tuple[str, Path, Path]]:
    if len(items) % 3:
        raise SheepdogError("expected CHR FILE LOG triples")
    return [(items[i], Path(items[i + 1]), Path(items[i + 2])) for i in range(0, len(items), 3)]


Emit = Callable[[str], None]


def kinship_step(geno: str, rank: int, here: Path, emit: Emit) -> None:
    genotypes = kinship.read_genotypes(Path(geno))
    x = kinship.centred(genotypes)
    kinship.write(here, x, genotypes.shape[1], rank)
    emit(f"{len(x)} of {len(genotypes)} SNPs kept for the centered kinship of "
         f"{genotypes.shape[1]} individuals")


def loco_matrix(chromosome: str | None, kinship_dirs: dict[str, Path], emit: Emit,
                gemma: str = "gemma") -> Any:
    """The LOCO kinship of one chromosome (None: of all SNPs) from the kinship pieces,
    computed with the BLAS `gemma` uses."""
    blas = gemmas_blas(gemma, _gemma_environment().get("PATH"))
    matrix = loco.kinship_of(kinship_dirs, chromosome, blas)
    emit(f"{'LOCO kinship of chr ' + chromosome if chromosome else 'kinship of all SNPs'}"
         f" by {blas.why}")
    return matrix


def loco_lmm(args: argparse.Namespace, here: Path, emit: Emit, complain: Emit,
             stop: threading.Event | None) -> int:
    """Write this chromosome's LOCO kinship (--full: the kinship of all SNPs), then run
    GEMMA's LMM on the chromosome's SNPs against it (with --part: on all the parts'
    SNPs, joined in the order given, as @geno and @anno)."""
    if not args.full and args.chromosome is None:
        raise SheepdogError("loco-lmm needs --chromosome, or --full")
    dirs = {args.pairs[i]: Path(args.pairs[i + 1]) for i in range(0, len(args.pairs), 2)}
    matrix = loco_matrix(None if args.full else args.chromosome, dirs, emit, args.gemma[0])
    loco.write_matrix(here / "loco.txt", matrix)
    files = {"@loco": "loco.txt"}
    if args.part:
        files.update({"@geno": "genotypes.txt", "@anno": "snps.txt"})
        _join([g for g, _ in args.part], here / files["@geno"])
        _join([a for _, a in args.part], here / files["@anno"])
    argv = [files.get(a, a) for a in args.gemma]
    code = run_streaming(argv, here, emit, complain, stop)
    for name in files.values():  # made again from the pieces: not worth a place in the cache
        (here / name).unlink(missing_ok=True)
    return code


def _join(paths: list[str], out: Path) -> None:
    with open(out, "wb") as joined:
        for path in paths:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, joined)


@functools.cache  # the worker's environment does not change: copy it once
def _gemma_environment() -> dict[str, str]:
    return dict(os.environ, **GEMMA_ENV)


def run_streaming(argv: list[str], here: Path, emit: Emit, complain: Emit,
                  stop: threading.Event | None) -> int:
    """A GEMMA process whose stdout/stderr lines go to the task's log as they come."""
    sinks = {"stdout": emit, "stderr": complain}

    def sink(stream: str, got: list[str]) -> None:
        for line in got:
            sinks[stream](line)

    proc = Process(argv, str(here), _gemma_environment(), sink)
    while (code := proc.poll()) is None:
        if stop is not None and stop.is_set():
            proc.kill()
        proc.wait(WATCH_POLL)
    if proc.failure():  # emit/complain failed: the step's log is not whole
        raise SheepdogError(proc.failure())
    return code


def gather(items: list[str], here: Path, emit: Emit) -> None:
    from .scan import plot

    pieces = [merge.Piece(c, a, lg) for c, a, lg in _triples(items)]
    summary = merge.merge(pieces, here / "assoc.txt")
    (here / "summary.json").write_text(json.dumps(summary, indent=1))
    plot.manhattan(here / "assoc.txt", here / "manhattan")
    best = summary["top_hits"][0] if summary["top_hits"] else None
    emit(f"merged {summary['snps']} SNPs of {len(summary['chromosomes'])} chromosomes from "
         f"{len(pieces)} piece{'s' if len(pieces) > 1 else ''}"
          + (f"; top hit {best['rs']} on chr {best['chr']}, {summary['p_column']} "
             f"{best[summary['p_column']]:.3g}" if best else ""))


def perm_prepare(args: argparse.Namespace, here: Path, emit: Emit) -> None:
    column = args.column or 1
    pheno = [row[column - 1] for row in read_table(Path(args.pheno), "phenotype")]
    covariates = check_covariates(Path(args.covariates), len(pheno)) if args.covariates else None
    items = args.items
    dirs = {items[i]: Path(items[i + 3]) for i in range(0, len(items), 4)}
    chroms = {items[i]: (Path(items[i + 1]), Path(items[i + 2]), loco_matrix(items[i], dirs, emit))
              for i in range(0, len(items), 4)}
    permute.prepare(pheno, covariates, chroms, here)
    meta = json.loads((here / "meta.json").read_text())
    emit(f"prepared {len(chroms)} chromosomes for {len(meta['analysed'])} individuals with "
         f"a phenotype: {meta['patterns']} distinct genotype patterns of {meta['snps']} SNPs")


def perm_gather(paths: list[str], here: Path, emit: Emit) -> None:
    found = []
    for path in paths:
        found += json.loads(Path(path).read_text())["permutations"]
    found.sort(key=lambda r: r["index"])
    result = permute.thresholds([r["min_p"] for r in found])
    result["minima"] = found
    (here / "permutations.json").write_text(json.dumps(result, indent=1))
    emit(f"{result['permutations']} permutations: significant p {result['significant']:.4g}"
          f" (-log10 {result['significant_minus_log10']:.2f}), suggestive p "
          f"{result['suggestive']:.4g} (-log10 {result['suggestive_minus_log10']:.2f})")


@functools.cache  # built once per process: steps run in-process, twenty at a time
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sheepdog.gemma.ops")
    sub = parser.add_subparsers(dest="op", required=True)
    kin = sub.add_parser("kinship")
    kin.add_argument("--rank", type=int, default=0, help="where the chromosome's SNPs come "
                     "in the genotype file: LOCO kinships take the pieces in this order")
    kin.add_argument("geno")
    lmm = sub.add_parser("loco-lmm")
    lmm.add_argument("--chromosome")
    lmm.add_argument("--full", action="store_true", help="the kinship of all SNPs, not LOCO")
    lmm.add_argument("--part", nargs=2, action="append", default=[],
                     metavar=("GENO", "ANNO"), help="with --full: a chromosome's files; "
                     "GEMMA reads them all, joined in this order, as @geno and @anno")
    lmm.add_argument("rest", nargs=argparse.REMAINDER)
    sub.add_parser("gather").add_argument("items", nargs="+")
    prep = sub.add_parser("perm-prepare")
    prep.add_argument("--pheno", required=True)
    prep.add_argument("--column", type=int)
    prep.add_argument("--covariates")
    prep.add_argument("items", nargs="+")
    batch = sub.add_parser("perm-batch")
    batch.add_argument("--prepared", required=True)
    for name in ("--seed", "--first", "--count", "--total", "--lmm"):
        batch.add_argument(name, type=int, required=True)
    batch.add_argument("--min-rule", default="sheepdog")
    batch.add_argument("--gemma-flags", default="[]", help="JSON list of more GEMMA flags")
    sub.add_parser("perm-gather").add_argument("items", nargs="+")
    sub.add_parser("pc-prepare").add_argument("items", nargs="+")
    sub.add_parser("pc-summary").add_argument("items", nargs="+")
    pc = sub.add_parser("pc-batch")
    pc.add_argument("--prepared", required=True)
    pc.add_argument("--traits", required=True)
    pc.add_argument("--test", choices=sorted(pcsteps.P_COLUMNS), default="lrt")
    pc.add_argument("--threshold", type=float, default=4.0)
    pc.add_argument("--covariates")
    pc.add_argument("--gemma-flags", default="[]", help="JSON list of more GEMMA flags")
    pc.add_argument("items", nargs="+")
    return parser


def _split_rest(rest: list[str]) -> tuple[list[str], list[str]]:
    """`-- GEMMA ARGS -- CHR DIR ...` into the two lists."""
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if "--" not in rest:
        raise SheepdogError("loco-lmm needs: -- GEMMA-ARGS -- CHR KINSHIP_DIR ...")
    cut = rest.index("--")
    return rest[:cut], rest[cut + 1:]


def _say(line: str) -> None:
    print(line, flush=True)


def _complain(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None, workdir: Path | None = None, emit: Emit = _say,
         complain: Emit = _complain, stop: threading.Event | None = None) -> int:
    """Run one step; 0 on success, 1 with an `ERROR:` line (GEMMA's style) otherwise."""
    args = _parser().parse_args(argv)
    here = workdir or Path.cwd()
    try:
        if args.op == "kinship":
            kinship_step(args.geno, args.rank, here, emit)
        elif args.op == "loco-lmm":
            args.gemma, args.pairs = _split_rest(args.rest)
            return loco_lmm(args, here, emit, complain, stop)
        elif args.op == "gather":
            gather(args.items, here, emit)
        elif args.op == "perm-prepare":
            perm_prepare(args, here, emit)
        elif args.op == "perm-batch":
            permute.run_batch(Path(args.prepared), args.seed, args.first, args.count,
                              args.total, args.lmm, here, emit, stop,
                              args.min_rule, json.loads(args.gemma_flags))
        elif args.op == "pc-prepare":
            pcsteps.prepare(args.items, here, emit)
        elif args.op == "pc-summary":
            pcsteps.summary(args.items, here, emit)
        elif args.op == "pc-batch":
            pcsteps.batch(args, here, emit, stop)
        else:
            perm_gather(args.items, here, emit)
    except (SheepdogError, OSError, ValueError, KeyError) as e:
        if is_disk_full(e):
            e = DiskFull(str(here), f"{args.op} wrote {getattr(e, 'filename', '') or 'its output'}")
        complain(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
