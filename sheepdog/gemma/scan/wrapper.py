"""`sheepdog-gemma-wrapper`: gemma-wrapper's command line and JSON record, computed by
sheepdog's pieces, cache and backends — so GN2's gemma-wrapper setting can point here.

    sheepdog-gemma-wrapper --json --loco 1,2,...,X -- -g G -p P -a A -gk > K.json
    sheepdog-gemma-wrapper --json --loco --input K.json -- -g G -p P -a A -lmm 9 -maf M
    sheepdog-gemma-wrapper --json -- -g G -p P -a A -gk > K.json          (no LOCO)
    sheepdog-gemma-wrapper --json --input K.json -- -g G -p P -a A -lmm 9

The first call computes the kinship pieces and writes a K record; the second runs the
LOCO scan against them and writes a GWA record whose `files` are [chromosome, GEMMA
log, assoc] per chromosome in genome order, as GN2's `parse_loco_output` reads them.
Without --loco the K record names one kinship of all SNPs (GEMMA's text, `.cXX.txt`)
and the GWA record one merged assoc file, chromosome `null`, as gemma-wrapper's.
Progress goes to stderr; only the JSON record goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ... import jobs, store
from ...cache import Cache
from ...config import Settings, load
from ...connection import connect
from ...errors import ConfigError, SheepdogError
from ...finalize import finalize
from ...models import Job, JobStatus
from ...runner import follow_job
from ..commands import check_gemma_flags, version
from . import result
from .build import SCAN_PARAMS, GemmaRequest, build_job, new_job_id, prepare, scan_tasks

# gemma-wrapper flags that would make a different run here, and why
UNSUPPORTED = {
    "--slurm": "sheepdog sends pieces to Slurm itself: set SHEEPDOG_BACKEND=slurm",
    "--dry-run": "sheepdog-gemma-wrapper always runs",
}
# in the kinship call only GEMMA flags that do not change -gk's result may come along
KINSHIP_HARMLESS = {"-debug", "-no-check", "-silence", "-gk"}
VALUED = {"-g", "-p", "-a", "-c", "-n", "-lmm", *(p.gemma for p in SCAN_PARAMS if p.gemma)}


class WrapperError(SheepdogError):
    """A command line gemma-wrapper would take but sheepdog cannot run as asked."""


@dataclass
class GemmaArgs:
    """What came after `--`: the inputs and options sheepdog knows, the rest passed on."""

    values: dict[str, str] = field(default_factory=dict)
    kinship: bool = False
    extra: list[str] = field(default_factory=list)


def parse_gemma(args: list[str]) -> GemmaArgs:
    parsed = GemmaArgs()
    i = 0
    while i < len(args):
        word = args[i]
        if word in VALUED:
            if i + 1 >= len(args):
                raise WrapperError(f"GEMMA flag {word} needs a value")
            parsed.values[word] = args[i + 1]
            i += 2
            continue
        if word == "-gk":
            parsed.kinship = True
            if i + 1 < len(args) and args[i + 1].isdigit():
                if args[i + 1] not in ("0", "1"):
                    raise WrapperError(f"-gk {args[i + 1]}: sheepdog computes GEMMA's "
                                       "centered kinship (-gk 1) only")
                i += 1
            i += 1
            continue
        parsed.extra.append(word)
        i += 1
    return parsed


def parse(argv: list[str]) -> tuple[argparse.Namespace, GemmaArgs]:
    """gemma-wrapper's options before `--`, GEMMA's after it."""
    cut = argv.index("--") if "--" in argv else len(argv)
    mine, gemma = argv[:cut], argv[cut + 1:]
    for word in mine:
        flag = word.split("=", 1)[0]
        if flag in UNSUPPORTED:
            raise WrapperError(f"{flag} is not supported: {UNSUPPORTED[flag]}")
    p = argparse.ArgumentParser(
        prog="sheepdog-gemma-wrapper", add_help=True,
        description="gemma-wrapper's command line, run by sheepdog: the kinship call (-gk) "
                    "writes a K record, the LMM call (-lmm, --input K.json) a GWA record, "
                    "as JSON on stdout with --json. GEMMA's own flags follow `--`.",
        epilog="example: sheepdog-gemma-wrapper --json --loco -- -g G -p P -a A -gk > K.json; "
               "sheepdog-gemma-wrapper --json --loco --input K.json -- -g G -p P -a A "
               "-lmm 9 -maf 0.05")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    p.add_argument("--loco", nargs="?", const="", default=None, metavar="CHR,...",
                   help="leave one chromosome out (optionally only these chromosomes)")
    p.add_argument("--input", metavar="K.json", help="the kinship call's record (LMM call)")
    p.add_argument("--force", action="store_true", help="recompute, not from the cache")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="where the record's files go (default: the temporary directory)")
    p.add_argument("--permutate", type=int, default=0, metavar="N",
                   help="N permutations of --phenotypes: thresholds in the record")
    p.add_argument("--phenotypes", "--permute-phenotypes", dest="phenotypes", metavar="FILE",
                   help="the phenotypes to shuffle for --permutate")
    p.add_argument("--lmdb", nargs="?", const="", default=None, metavar="FILE",
                   help="also write the scan as gemma2lmdb's LMDB file")
    p.add_argument("--parallel", action="store_true",
                   help="accepted; sheepdog runs the pieces in parallel anyway")
    p.add_argument("-v", "--verbose", action="store_true", help="accepted (no effect)")
    p.add_argument("-d", "--debug", action="store_true", help="accepted (no effect)")
    p.add_argument("--q", "--quiet", dest="quiet", action="store_true",
                   help="no progress lines on stderr")
    options, unknown = p.parse_known_args(mine)
    if unknown:
        raise WrapperError(f"gemma-wrapper option {unknown[0]} is not supported by "
                           "sheepdog-gemma-wrapper")
    if not gemma:
        raise WrapperError("give GEMMA's arguments after '--'")
    return options, parse_gemma(gemma)


def _path(gemma: GemmaArgs, flag: str, role: str) -> Path:
    if flag not in gemma.values:
        raise WrapperError(f"GEMMA's {flag} ({role} file) is needed")
    return Path(gemma.values[flag])


def _request(options: argparse.Namespace, gemma: GemmaArgs, settings: Settings,
             warnings: list[str]) -> GemmaRequest:
    values = gemma.values
    pheno = Path(options.phenotypes) if options.permutate else _path(gemma, "-p", "phenotype")
    if options.permutate and not options.phenotypes:
        raise WrapperError("--permutate needs --phenotypes FILE (the phenotypes to shuffle)")
    if "-lmm" not in values and not gemma.kinship:
        warnings.append("no -lmm given: running -lmm 9")
    try:
        request = GemmaRequest(
            geno=_path(gemma, "-g", "genotype"), pheno=pheno,
            anno=_path(gemma, "-a", "annotation"),
            covariates=Path(values["-c"]) if "-c" in values else None,
            column=int(values["-n"]) if "-n" in values else None,
            lmm=int(values.get("-lmm", 9)),
            options=SCAN_PARAMS.from_gemma(values),
            permutations=options.permutate, force=options.force,
            backend=settings.backend, host=settings.host,
            gemma_flags=check_gemma_flags(gemma.extra))
    except ValueError as e:
        raise WrapperError(f"a GEMMA value is not a number: {e}") from e
    return request


def _wait(conn: Any, settings: Settings, job: Job, err: IO[str], quiet: bool) -> Job:
    """Follow the job to its end, its lines on stderr (stdout is the record's)."""
    for line in follow_job(conn, settings, job.id, job.queue):
        if not quiet or line.stream == "stderr":
            err.write(f"[{line.piece or 'sheepdog'}] {line.text}\n")
    err.flush()
    return store.get_job(conn, job.id)


def _check_ended(job: Job) -> None:
    if job.status != JobStatus.SUCCESS:
        raise WrapperError(f"job {job.id} {job.status}: {job.error or 'see its log'}",)


def _known(wanted: list[str], chromosomes: Any, who: str, request: GemmaRequest) -> None:
    unknown = [c for c in wanted if c not in chromosomes]
    if unknown:
        raise WrapperError(f"{who} chromosome {unknown[0]!r}, which is not in {request.anno}")


def kinship_step(options: argparse.Namespace, gemma: GemmaArgs, settings: Settings,
                 cache: Cache, err: IO[str]) -> dict[str, Any]:
    """`-gk`: the kinship pieces, per chromosome; a K record of them with --loco, of the
    kinship of all SNPs (formed from them) without."""
    harmful = next((w for w in gemma.extra if w.startswith("-")
                    and w not in KINSHIP_HARMLESS), None)
    if harmful:
        raise WrapperError(f"GEMMA flag {harmful} in the kinship call would change -gk's "
                           "result, which sheepdog computes itself")
    warnings: list[str] = []
    gemma.extra = [w for w in gemma.extra if w in KINSHIP_HARMLESS]
    request = _request(options, gemma, settings, warnings)
    request.loco = options.loco is not None
    prep = prepare(request, cache)
    wanted = [c for c in (options.loco or "").split(",") if c] or prep.order
    _known(wanted, prep.chromosomes, "--loco names", request)
    gemma_version = version(cache_dir=cache.root / "versions")
    env = f"gemma {gemma_version}; sheepdog {_version()}; guix none"
    kinships, _, _, _ = scan_tasks(prep, request, settings, env)
    job = Job(id=new_job_id(), workflow="gemma-kinship", backend=request.backend,
              host=request.host, queue=settings.queue, final_task=kinships[-1].id,
              params={"chromosomes": prep.order})
    conn = connect(settings)
    if options.force:
        store.forget(conn, [t.id for t in kinships], cache.remove)
    jobs.submit(conn, settings, job, kinships)
    job = _wait(conn, settings, job, err, options.quiet)
    _check_ended(job)
    by_chrom = dict(zip(prep.order, kinships, strict=True))
    record: dict[str, Any] = {
        "type": "K", "cache_hit": job.cached == job.total, "gemma_version": gemma_version,
        "warnings": warnings,
        "sheepdog": {"job": job.id, "geno": prep.hashes["geno"], "anno": prep.hashes["anno"],
                     "kinship": {c: by_chrom[c].id for c in wanted}}}
    inputs = f"gemma -g {request.geno} -p {request.pheno} -a {request.anno} -gk 1"
    return _k_files(record, options, request, cache, by_chrom, wanted, inputs, job.id)


def _k_files(record: dict[str, Any], options: argparse.Namespace, request: GemmaRequest,
             cache: Cache, by_chrom: dict[str, Any], wanted: list[str], inputs: str,
             job_id: str) -> dict[str, Any]:
    """The K record's files: the kinship pieces (LOCO), or the kinship of all SNPs."""
    if request.loco:
        record["files"] = [[c, str(cache.task_dir(by_chrom[c].id) / "kinship.json"),
                            str(cache.task_dir(by_chrom[c].id) / "centred.npy")] for c in wanted]
        record["gemma_command"] = f"{inputs} -loco {wanted[-1]}"
        record["sheepdog"]["note"] = ("kinship pieces (each chromosome's centred SNPs); each "
                                      "LMM piece forms its LOCO kinship from them")
        return record
    record["files"] = [[None, *map(str, _full_kinship(options, cache, by_chrom, job_id))]]
    record["gemma_command"] = inputs
    record["sheepdog"]["note"] = ("the kinship of all SNPs, formed from the per-chromosome "
                                  "kinship pieces as GEMMA's -gk 1 forms it")
    return record


def _full_kinship(options: argparse.Namespace, cache: Cache, by_chrom: dict[str, Any],
                  job_id: str) -> tuple[Path, Path]:
    """(log, kinship) in gemma-wrapper's cache directory: the kinship of all SNPs as
    GEMMA's -gk 1 writes it (.cXX.txt), named by the pieces it came from."""
    from .blas import gemmas
    from .kinship import meta
    from .loco import kinship_of, write_matrix

    out_dir = Path(options.cache_dir or tempfile.gettempdir())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = hashlib.sha256("".join(t.id for t in by_chrom.values()).encode()).hexdigest()[:40]
    kin, log = out_dir / f"{stem}.cXX.txt", out_dir / f"{stem}.log.txt"
    if not (kin.exists() and log.exists()):
        pieces = {c: cache.task_dir(t.id) for c, t in by_chrom.items()}
        blas = gemmas()
        tmp = out_dir / f".{kin.name}.{os.getpid()}.tmp"
        write_matrix(tmp, kinship_of(pieces, None, blas))
        os.replace(tmp, kin)
        snps = sum(meta(d)["snps"] for d in pieces.values())
        text = (f"## sheepdog job {job_id}: the centered kinship (-gk 1) of all {snps} "
                f"SNPs of {len(pieces)} chromosomes, from sheepdog's kinship pieces, by "
                f"{blas.why}\n")
        tmp = out_dir / f".{log.name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, log)
    return log, kin


def _version() -> str:
    from ... import __version__

    return __version__


def _read_k(path: str | None) -> dict[str, Any]:
    if not path:
        raise WrapperError("the LMM call needs --input K.json (from the -gk call)")
    try:
        k = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WrapperError(f"--input {path}: cannot read a K record: {e}") from e
    if not isinstance(k, dict) or k.get("type") != "K":
        raise WrapperError(f"JSON problem, file {path} is not -gk derived")
    if not isinstance(k.get("files"), list) or not k["files"]:
        raise WrapperError(f"{path}: the K record names no kinship files")
    return k


def _publish(src: Path, dst: Path) -> None:
    """Copy into gemma-wrapper's cache directory, whole or not at all."""
    if dst.exists():
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def gwa_step(options: argparse.Namespace, gemma: GemmaArgs, settings: Settings, cache: Cache,
             err: IO[str]) -> dict[str, Any]:
    """The LMMs against the K record's kinship: LOCO (with --loco) or the kinship of all
    SNPs (without, as the record says); a GWA record."""
    k = _read_k(options.input)
    loco = options.loco is not None
    _same_kind(k, loco, options.input)
    warnings: list[str] = []
    request = _request(options, gemma, settings, warnings)
    request.loco = loco
    job, tasks = build_job(request, settings, cache)
    ours = job.params["inputs"]
    if k.get("sheepdog", {}).get("geno") not in (None, ours["geno"]["sha256"]):
        raise WrapperError(f"--input {options.input} was computed from other genotypes "
                           f"than {request.geno}")
    wanted = [rec[0] for rec in k["files"]] if loco else job.params["chromosomes"]
    _known(wanted, job.params["chromosomes"], f"{options.input} names", request)
    conn = connect(settings)
    jobs.submit(conn, settings, job, tasks)  # with --force, forgets the pieces first
    job = _wait(conn, settings, job, err, options.quiet)
    _check_ended(job)
    finalize(conn, settings, job.id)
    job = store.get_job(conn, job.id)
    out_dir = Path(options.cache_dir or tempfile.gettempdir())
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = job.params["scan_task"][:40]
    by_chrom = {c: (Path(str(log)), Path(str(assoc))) for c, log, assoc in
                result.piece_files(store.job_tasks(conn, job.id), cache)}
    merged = cache.task_dir(job.params["scan_task"]) / "assoc.txt"
    files = _gwa_files(out_dir, stem, [c for c in job.params["chromosomes"] if c in wanted],
                       by_chrom, None if loco else merged)
    described = result.describe(conn, settings, job)
    record: dict[str, Any] = {
        "type": "GWA", "files": files, "cache_hit": job.cached == job.total,
        "gemma_command": _gemma_command(request, described), "warnings": warnings,
        "gemma_version": described["gemma_version"],
        "sheepdog": {"job": job.id, "assoc": str(merged), "top_hits": described["top_hits"]}}
    if "permutations" in described:
        record["permutations"] = described["permutations"]
    if options.lmdb is not None:
        db = Path(options.lmdb) if options.lmdb else out_dir / f"{stem}.mdb"
        record.update(lmdb=str(db), lmdb_hits=len(result.write_lmdb(conn, settings, job,
                                                                    db)["hits"]))
    return record


def _same_kind(k: dict[str, Any], loco: bool, where: str) -> None:
    """The K record holds LOCO kinships exactly when this call is --loco."""
    if loco != (k["files"][0][0] is not None):
        raise WrapperError(f"--input {where} holds "
                           f"{'a full-genome K' if loco else 'LOCO kinships'}: "
                           f"{'drop' if not loco else 'add'} --loco "
                           f"{'in' if loco else 'to'} the kinship call, or "
                           f"{'drop' if loco else 'add'} it here")


def _gwa_files(out_dir: Path, stem: str, chromosomes: list[str],
               by_chrom: dict[str | None, tuple[Path, Path]], merged: Path | None
               ) -> list[list[Any]]:
    """The record's [chromosome, log, assoc] in gemma-wrapper's cache directory: one per
    chromosome (LOCO), or the merged assoc with the one piece's GEMMA log (`merged`)."""
    if merged is not None:
        dst_log, dst_assoc = out_dir / f"{stem}.log.txt", out_dir / f"{stem}.assoc.txt"
        _publish(by_chrom[None][0], dst_log)
        _publish(merged, dst_assoc)
        return [[None, str(dst_log), str(dst_assoc)]]
    files: list[list[Any]] = []
    for chrom in chromosomes:
        log, assoc = by_chrom[chrom]
        dst_log = out_dir / f"{stem}.{chrom}.log.txt"
        dst_assoc = out_dir / f"{stem}.{chrom}.assoc.txt"
        _publish(log, dst_log)
        _publish(assoc, dst_assoc)
        files.append([chrom, str(dst_log), str(dst_assoc)])
    return files


def _gemma_command(request: GemmaRequest, described: dict[str, Any]) -> str:
    """The GEMMA command each LMM piece ran (its kinship formed just before: LOCO, or of
    all SNPs)."""
    words = ["gemma", "-g", str(request.geno), "-p", str(request.pheno), "-a",
             str(request.anno), "-k", "loco.txt" if request.loco else "kinship.cXX.txt",
             "-lmm", str(request.lmm)]
    words += request.gemma_options()
    if request.covariates:
        words += ["-c", str(request.covariates)]
    if request.column:
        words += ["-n", str(request.column)]
    return " ".join([*words, *request.gemma_flags,
                     *(["-loco", "<chromosome>"] if request.loco else [])])


def run(argv: list[str], out: IO[str], err: IO[str]) -> int:
    record: dict[str, Any] = {"warnings": [], "errno": 0, "debug": []}
    as_json = "--json" in argv[:argv.index("--")] if "--" in argv else "--json" in argv
    try:
        options, gemma = parse(argv)
        settings = load()
        cache = Cache(settings.cache_dir)
        step = kinship_step if gemma.kinship else gwa_step
        found = step(options, gemma, settings, cache, err)
        record.update(found, warnings=record["warnings"] + found.get("warnings", []))
    except (SheepdogError, ConfigError, OSError) as e:
        record["errno"] = getattr(e, "exit_code", 1) or 1
        record["error"] = str(e)
        err.write(f"sheepdog-gemma-wrapper: {e}\n")
    if as_json:
        out.write(json.dumps(record) + "\n")
    elif not record["errno"]:
        for chrom, log, data in record.get("files", []):
            out.write(f"{chrom}\t{log}\t{data}\n")
    out.flush()
    return int(record["errno"])


def main() -> None:
    sys.exit(run(sys.argv[1:], sys.stdout, sys.stderr))
