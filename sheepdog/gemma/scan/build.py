"""GEMMA LOCO scans, whole-genome scans and permutation runs as graphs of
content-addressed tasks.

    split (here, while validating) -> kinship per chromosome
        -> LMM per chromosome (its LOCO kinship as GEMMA computes it, then GEMMA on
           that chromosome's SNPs), or without LOCO one LMM (the kinship of all SNPs,
           then GEMMA on all of them) -> gather
    kinships -> permutation prep (LOCO kinships cut to the analysed individuals)
        -> permutation batches -> thresholds

Kinship pieces see only the genotypes, so every trait scanned on the same genotypes
shares them.
"""

from __future__ import annotations

import json
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import __version__
from ...cache import Cache, sha256_file
from ...config import Settings
from ...defaults import MAX_CHROMOSOMES
from ...errors import ConfigError, DiskFull, InputError, is_disk_full
from ...jobs import check_backend, new_job_id
from ...models import Job, Task
from ...params import Param, Params
from ..commands import COMPLETE, GEMMA_ENV, LMM_MODES, check_gemma_flags, lmm_argv, version
from ..formats import bimbam, traits
from ..formats import convert as formats
from .merge import WHOLE, piece_name
from .permute import MIN_RULES

OPS = ["-m", "sheepdog.gemma.ops"]

# The scans' request parameters, each declared once: the CLI options, the POST /jobs
# schema and parsing, the checks and the job's record come from here.
MAF = Param("maf", float, 0.01, "GEMMA -maf (GEMMA's own default, as GN passes it).",
            minimum=0, below=0.5, gemma="-maf")
SCAN_PARAMS = Params(
    Param("column", int, None, "Phenotype column (1-based).", minimum=1, flags=("-n",)),
    Param("lmm", int, 9, "GEMMA -lmm mode.", choices=LMM_MODES),
    MAF,
    Param("force", bool, False, "Recompute instead of using the cache.", recorded=False),
    Param("gemma_flags", list, [], "More GEMMA flags for the LMM pieces (on the command "
          "line: after --).", cli=False),
)
PERMUTATION_PARAMS = Params(
    Param("permutations", int, 1000, "How many permutations.", minimum=1, recorded=False),
    Param("seed", int, None, "Makes the permutations reproducible.", recorded=False),
    Param("batch_size", int, 25, "Permutations per piece.", minimum=1, recorded=False),
    Param("min_rule", str, "sheepdog", "Each permutation's minimum: over every p "
          "(sheepdog), or the last column's p > 0 (gemma-wrapper).", choices=MIN_RULES),
)


@dataclass
class GemmaRequest:
    """What the user asked for, as given on the command line or in POST /jobs."""

    geno: Path  # BIMBAM, GN .geno or an R/qtl2 control file
    pheno: Path | None = None  # None: the R/qtl2 control file's pheno
    anno: Path | None = None  # BIMBAM only
    covariates: Path | None = None
    column: int | None = None
    lmm: int = 9
    permutations: int = 0
    seed: int | None = None
    batch_size: int = 25
    backend: str = "local"
    host: str = ""
    queue: str = ""
    out_dir: str = ""
    force: bool = False
    gemma_flags: list[str] = field(default_factory=list)  # more GEMMA flags for the LMMs
    min_rule: str = "sheepdog"  # permutation minimum: every p, or gemma-wrapper's p > 0
    lmdb: str = ""  # also write the merged scan as gemma2lmdb's LMDB here
    loco: bool = True  # False: one kinship of all SNPs for every chromosome's LMM
    # the directories files named inside an input (an R/qtl2 control file's) must be in:
    # a request's upload and the input roots; () for a user's own command line
    confine: tuple[str, ...] = ()
    # every declared parameter's value as asked (SCAN_PARAMS, PERMUTATION_PARAMS): the
    # job's record of its options comes from here, a parameter declared later included
    options: dict[str, Any] = field(default_factory=dict)

    def declared(self) -> dict[str, Any]:
        """Every declared parameter's value: a field's, else as asked, else its default."""
        return {**{p.name: getattr(self, p.name, self.options.get(p.name, p.default))
                   for p in (*SCAN_PARAMS, *PERMUTATION_PARAMS)},
                **{k: v for k, v in self.options.items() if not hasattr(self, k)}}

    def gemma_options(self) -> list[str]:
        """The declared parameters that are GEMMA's own flags (-maf ...), as GEMMA takes
        them."""
        return SCAN_PARAMS.gemma_flags(self.declared())

    def record(self) -> dict[str, Any]:
        """The job's record of its options: the declared ones as declared, and any other
        the request's workflow declares (a parameter added to it, say) as asked."""
        known = {p.name for p in (*SCAN_PARAMS, *PERMUTATION_PARAMS)}
        return {**SCAN_PARAMS.record(self.declared()),
                **PERMUTATION_PARAMS.record(self.declared()),
                **{k: v for k, v in self.options.items() if k not in known}}

    def check(self) -> None:
        SCAN_PARAMS.check(self.declared())
        if self.permutations:
            PERMUTATION_PARAMS.check(self.declared())
        elif self.permutations < 0:
            raise ConfigError(f"--permutations must be at least 1, got {self.permutations}")
        if self.permutations and not self.loco:
            raise ConfigError("permutations run LOCO scans: use gemma-permute")
        self.gemma_flags = check_gemma_flags(self.gemma_flags, SCAN_PARAMS.gemma_advice())
        check_backend(self.backend, self.host)


@dataclass
class Prepared:
    """Validated inputs, in the store by content hash."""

    individuals: int
    snps: int
    chromosomes: dict[str, dict[str, Any]]  # name -> {"geno": sha, "anno": sha, "snps": n}
    hashes: dict[str, str]  # input role -> sha256 of the user's file, as given
    blobs: dict[str, str]  # input role -> sha256 of the normalized copy GEMMA reads
    pheno_values: list[str]
    order: list[str] = field(default_factory=list)
    # GEMMA's -n: the user's column of a BIMBAM phenotype file; None when the column was
    # taken out of an id-keyed table into a file of its own
    gemma_column: int | None = None


def _exists(path: Path | None, role: str) -> Path | None:
    if path is None:
        return None
    if not path.is_file():
        raise InputError(str(path), f"{role} file does not exist or is not a file")
    return path


def _put(store: Cache, path: Path) -> str:
    sha = sha256_file(path)
    if not store.has_blob(sha):
        store.put_file(path)
    return sha


def _put_normalized(store: Cache, path: Path) -> str:
    """A plain, LF-ended copy (GEMMA would read 'NA\\r' as a number); returns its hash."""
    tmp = store.tmp / f"norm.{os.getpid()}.{threading.get_ident()}"
    with open(tmp, "w") as out:
        for _, text in bimbam.lines(path):
            out.write(text.strip() + "\n")
    sha = sha256_file(tmp)
    store.put_blob_file(tmp, sha)
    return sha


def _split(store: Cache, geno: Path, anno: Path, geno_sha: str, anno_sha: str,
           max_chromosomes: int = MAX_CHROMOSOMES) -> dict[str, Any]:
    """Per-chromosome files, computed once per (geno, annotation) contents."""
    manifest = store.root / "splits" / f"{geno_sha[:32]}-{anno_sha[:32]}.json"
    if manifest.exists():
        known = json.loads(manifest.read_text())
        shas = [c.get(k, "") for c in known["chromosomes"].values()
                for k in ("geno", "matrix", "anno")]
        if all(s and store.blob(s).exists() for s in shas):
            return dict(known)
    scratch = store.scratch("split")
    try:
        split = bimbam.split_genotypes(geno, anno, scratch, max_chromosomes)
        chromosomes = {
            name: {"geno": store.put_file(Path(info["geno"])),  # type: ignore[arg-type]
                   "matrix": store.put_file(Path(info["matrix"])),  # type: ignore[arg-type]
                   "anno": store.put_file(Path(info["anno"])),  # type: ignore[arg-type]
                   "snps": info["snps"]}
            for name, info in split.chromosomes.items()}
    finally:
        store.discard(scratch)
    known = {"individuals": split.individuals, "snps": split.snps, "chromosomes": chromosomes}
    manifest.parent.mkdir(exist_ok=True)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps(known))
    tmp.replace(manifest)
    return known


def prepare(request: GemmaRequest, store: Cache,
            max_chromosomes: int = MAX_CHROMOSOMES) -> Prepared:
    """Validate every input (naming file, line and problem) and stage it by hash."""
    try:
        return _prepare(request, store, max_chromosomes)
    except OSError as e:
        if is_disk_full(e):  # the cache's disk, not the input, is the problem
            raise DiskFull(str(store.root), "staging the inputs") from e
        raise


def genotypes(request: GemmaRequest, store: Cache, max_chromosomes: int = MAX_CHROMOSOMES,
              loco: bool = True) -> tuple[formats.Genotypes, dict[str, str], dict[str, Any]]:
    """(the genotypes as BIMBAM, input hashes, their split), checked."""
    geno = _exists(request.geno, "genotype")
    anno = _exists(request.anno, "annotation")
    assert geno
    found = formats.load(store, geno, anno, request.confine)
    hashes = {"geno": _put(store, geno)}
    if anno is not None:
        hashes["anno"] = _put(store, anno)
        shas = hashes["geno"], hashes["anno"]
    else:  # converted: the blobs are named by their hashes
        shas = found.geno.name, found.anno.name
    known = _split(store, found.geno, found.anno, shas[0], shas[1], max_chromosomes)
    if loco and len(known["chromosomes"]) < 2:
        raise InputError(str(anno or geno), "LOCO needs SNPs on at least two chromosomes")
    return found, hashes, known


def _put_column(store: Cache, values: Any, covariates: bool = False) -> str:
    tmp = store.tmp / f"col.{os.getpid()}.{threading.get_ident()}"
    (traits.covariate_file if covariates else traits.column_file)(values, tmp)
    sha = sha256_file(tmp)
    store.put_blob_file(tmp, sha)
    return sha


def _phenotypes(request: GemmaRequest, store: Cache, found: formats.Genotypes
                ) -> tuple[list[str], str, str, bool]:
    """(the chosen column's values, the user's file's hash, the BIMBAM copy's hash,
    whether that copy holds the chosen column alone)."""
    pheno = _exists(request.pheno, "phenotype") or (
        found.control.pheno if found.control else None)
    if pheno is None:
        raise InputError(str(found.source), "no phenotypes: give -p (the control file names "
                         "no 'pheno' either)" if found.control else "no phenotypes: give -p")
    column = request.column or 1
    if found.individuals is None and not traits.has_header(pheno):
        values = bimbam.check_phenotypes(pheno, found.count, column)
        return values, sha256_file(pheno), _put_normalized(store, pheno), False
    table = found.traits(pheno, "phenotype")
    if column > len(table.traits):
        raise InputError(str(pheno), f"has {len(table.traits)} phenotype columns; -n {column} "
                         f"asks for column {column}")
    chosen = table.values[:, column - 1]
    if all(v != v for v in chosen):
        raise InputError(str(pheno), f"phenotype {table.traits[column - 1]!r} is missing for "
                         "every genotyped individual")
    return ([traits.text(v) for v in chosen], sha256_file(pheno), _put_column(store, chosen),
            True)


def covariate_blob(path: Path | None, store: Cache, found: formats.Genotypes
                   ) -> tuple[str, str] | None:
    """(the user's file's hash, the hash of GEMMA's copy), or None without covariates."""
    path = path or (found.control.covar if found.control else None)
    if path is None:
        return None
    if found.individuals is None and not traits.has_header(path):
        bimbam.check_covariates(path, found.count)
        return sha256_file(path), _put_normalized(store, path)
    table = found.traits(path, "covariate")
    return sha256_file(path), _put_column(store, table.values, covariates=True)


def _prepare(request: GemmaRequest, store: Cache, max_chromosomes: int) -> Prepared:
    request.check()
    found, hashes, known = genotypes(request, store, max_chromosomes, request.loco)
    values, hashes["pheno"], pheno_blob, alone = _phenotypes(request, store, found)
    blobs = {"pheno": pheno_blob}
    covariates = covariate_blob(_exists(request.covariates, "covariate"), store, found)
    if covariates:
        hashes["covariates"], blobs["covariates"] = covariates
    order = sorted(known["chromosomes"], key=bimbam.chromosome_order)
    return Prepared(int(known["individuals"]), int(known["snps"]), known["chromosomes"],
                    hashes, blobs, values, order, None if alone else request.column)


def gemma_task(name: str, argv: list[Any], inputs: dict[str, str], deps: list[str],
                outputs: list[str], env: str, request: GemmaRequest, settings: Settings,
                log: str | None = None) -> Task:
    return Task(name=name, argv=argv, inputs=inputs, deps=deps, outputs=outputs,
                env=dict(GEMMA_ENV), environment=env, max_attempts=settings.max_attempts,
                retry_on_failure=True, backend=request.backend, host=request.host,
                queue=request.queue or settings.queue,
                complete_when={log: COMPLETE} if log else {})


def kinship_tasks(prep: Prepared, request: GemmaRequest, settings: Settings, env: str
                  ) -> dict[str, Task]:
    """One kinship piece per chromosome (its centred SNPs): they see only the genotypes,
    so every scan and precompute of the same genotypes shares them."""
    kinships = {}
    in_file = list(prep.chromosomes)  # the order GEMMA meets their SNPs in
    for chrom in prep.order:
        c = prep.chromosomes[chrom]
        argv = [{"python": True}, *OPS, "kinship", "--rank", str(in_file.index(chrom)),
                {"input": "geno"}]
        kinships[chrom] = gemma_task(f"kinship chr {chrom}", argv, {"geno": c["matrix"]}, [],
                                     ["centred.npy", "kinship.json"], env, request, settings)
    return kinships


LMM_LOG = "output/lmm.log.txt"


def _lmm_task(prep: Prepared, request: GemmaRequest, settings: Settings, env: str,
              kinships: dict[str, Task], kinship_dirs: list[Any], chrom: str) -> Task:
    """GEMMA's LMM of one chromosome's SNPs against its LOCO kinship, or (WHOLE) of every
    SNP against the kinship of all SNPs. Without LOCO the SNPs are not split: GEMMA
    computes Uᵀx for a batch of SNPs with one dgemm, and with some BLAS kernels
    (OpenBLAS's Haswell and Zen, measured on BXD) a column's last bits depend on how many
    SNPs the batch holds, so a chromosome alone would differ from GEMMA's run of all."""
    inputs = {"pheno": prep.blobs["pheno"]}
    if "covariates" in prep.blobs:
        inputs["covariates"] = prep.blobs["covariates"]
    geno: Any
    anno: Any
    head: list[Any]
    if chrom == WHOLE:  # every chromosome's files, joined in the order GEMMA meets them
        geno, anno, head = "@geno", "@anno", ["--full"]
        for name, files in prep.chromosomes.items():
            inputs[f"geno.{name}"], inputs[f"anno.{name}"] = files["geno"], files["anno"]
            head += ["--part", {"input": f"geno.{name}"}, {"input": f"anno.{name}"}]
    else:
        files = prep.chromosomes[chrom]
        inputs["geno"], inputs["anno"] = files["geno"], files["anno"]
        geno, anno, head = {"input": "geno"}, {"input": "anno"}, ["--chromosome", chrom]
    gemma = lmm_argv(geno, {"input": "pheno"}, anno, "@loco", request.lmm,
                     request.gemma_options(),
                     {"input": "covariates"} if "covariates" in inputs else None,
                     prep.gemma_column, request.gemma_flags)
    argv = [{"python": True}, *OPS, "loco-lmm", *head, "--", *gemma, "--", *kinship_dirs]
    return gemma_task(piece_name(chrom), argv, inputs, [t.id for t in kinships.values()],
                      ["output/lmm.assoc.txt", LMM_LOG], env, request, settings,
                      LMM_LOG)


def scan_tasks(prep: Prepared, request: GemmaRequest, settings: Settings,
               env: str) -> tuple[list[Task], list[Task], list[Task], Task]:
    """(kinship tasks, all scan tasks in order, LMM tasks, gather task)."""
    kinships = kinship_tasks(prep, request, settings, env)
    kinship_dirs: list[Any] = []
    for chrom, t in kinships.items():
        kinship_dirs += [chrom, {"dep": t.id, "file": "."}]
    lmms = [_lmm_task(prep, request, settings, env, kinships, kinship_dirs, chrom)
            for chrom in (prep.order if request.loco else [WHOLE])]
    gather_argv: list[Any] = [{"python": True}, *OPS, "gather"]
    for chrom, t in zip(prep.order if request.loco else [WHOLE], lmms, strict=True):
        gather_argv += [chrom, {"dep": t.id, "file": "output/lmm.assoc.txt"},
                        {"dep": t.id, "file": LMM_LOG}]
    gather = gemma_task("gather", gather_argv, {}, [t.id for t in lmms],
                         ["assoc.txt", "summary.json", "manhattan.png", "manhattan.svg"],
                         env, request, settings)
    kin = list(kinships.values())
    return kin, [*kin, *lmms, gather], lmms, gather


def permutation_tasks(prep: Prepared, request: GemmaRequest, settings: Settings, env: str,
                      kinships: list[Task], seed: int) -> tuple[list[Task], Task]:
    """(prep + batches + thresholds, the thresholds task)."""
    inputs = {"pheno": prep.blobs["pheno"]}
    argv: list[Any] = [{"python": True}, *OPS, "perm-prepare", "--pheno", {"input": "pheno"}]
    if prep.gemma_column:
        argv += ["--column", str(prep.gemma_column)]
    if "covariates" in prep.blobs:
        inputs["covariates"] = prep.blobs["covariates"]
        argv += ["--covariates", {"input": "covariates"}]
    for chrom, kin in zip(prep.order, kinships, strict=True):
        c = prep.chromosomes[chrom]
        inputs[f"geno.{chrom}"], inputs[f"anno.{chrom}"] = c["geno"], c["anno"]
        argv += [chrom, {"input": f"geno.{chrom}"}, {"input": f"anno.{chrom}"},
                 {"dep": kin.id, "file": "."}]
    prepare_task = gemma_task("permutation prep", argv, inputs, [k.id for k in kinships],
                               ["meta.json"], env, request, settings)
    batches = []
    total = request.permutations
    for first in range(0, total, request.batch_size):
        count = min(request.batch_size, total - first)
        bargv: list[Any] = [{"python": True}, *OPS, "perm-batch",
                            "--prepared", {"dep": prepare_task.id, "file": "."},
                            "--seed", str(seed), "--first", str(first), "--count", str(count),
                            "--total", str(total), "--lmm", str(request.lmm)]
        if request.min_rule != "sheepdog":  # only then: default pieces keep their ids
            bargv += ["--min-rule", request.min_rule]
        bargv += ["--gemma-flags", json.dumps(request.gemma_options() + request.gemma_flags)]
        batches.append(gemma_task(f"permutations {first + 1}-{first + count}", bargv, {},
                                   [prepare_task.id], ["batch.json"], env, request, settings))
    gather_argv: list[Any] = [{"python": True}, *OPS, "perm-gather"]
    gather_argv += [{"dep": b.id, "file": "batch.json"} for b in batches]
    thresholds = gemma_task("permutation thresholds", gather_argv, {},
                             [b.id for b in batches], ["permutations.json"], env, request,
                             settings)
    return [prepare_task, *batches, thresholds], thresholds


def build_job(request: GemmaRequest, settings: Settings, store: Cache,
              job_id: str | None = None) -> tuple[Job, list[Task]]:
    """Validate, stage and expand a gemma-loco or gemma-permute request; the work one
    request may ask for is bounded by the settings (permutations, pieces, chromosomes)."""
    if request.permutations > settings.max_permutations:
        raise ConfigError(f"--permutations {request.permutations:,d}: at most "
                          f"{settings.max_permutations:,d} (max_permutations)")
    batches = -(-request.permutations // max(1, request.batch_size))
    if batches > settings.max_pieces:
        raise ConfigError(f"{request.permutations:,d} permutations in batches of "
                          f"{request.batch_size} make {batches:,d} pieces; at most "
                          f"{settings.max_pieces:,d} (max_pieces): raise --batch-size")
    prep = prepare(request, store, settings.max_chromosomes)
    gemma_version = version(cache_dir=store.root / "versions")
    # what a piece's result depends on besides its inputs: GEMMA's and sheepdog's versions
    env = f"gemma {gemma_version}; sheepdog {__version__}; guix none"
    kinships, tasks, _lmms, gather = scan_tasks(prep, request, settings, env)
    workflow = "gemma-loco" if request.loco else "gemma"
    final = gather
    seed = request.seed
    if request.permutations:
        workflow = "gemma-permute"
        seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        more, final = permutation_tasks(prep, request, settings, env, kinships, seed)
        tasks += more
    params = {
        "inputs": {role: {"path": str(getattr(request, role) or request.geno), "sha256": sha}
                   for role, sha in prep.hashes.items()},
        "options": {**request.record(), "covariates": "covariates" in prep.blobs,
                    "loco": request.loco},
        "gemma_version": gemma_version, "individuals": prep.individuals, "snps": prep.snps,
        "chromosomes": prep.order, "scan_task": gather.id,
    }
    if request.force:
        params["forced"] = [t.id for t in tasks]
    if request.lmdb:
        params["lmdb"] = str(Path(request.lmdb).resolve())
    if request.permutations:
        params.update(permutations=request.permutations, seed=seed,
                      batch_size=request.batch_size, permutation_task=final.id)
    job = Job(id=job_id or new_job_id(), workflow=workflow, params=params, backend=request.backend,
              host=request.host, queue=request.queue or settings.queue,
              out_dir=str(Path(request.out_dir).resolve()) if request.out_dir else "",
              final_task=final.id)
    return job, tasks
