"""A precompute: GEMMA LOCO scans of every trait of a dataset, as one job.

    kinship per chromosome (shared with every scan of these genotypes)
        -> prepare (LOCO kinships as GEMMA reads them, the SNP table)
        -> batches of traits (GEMMA per trait and chromosome) -> summary

Each trait's result is addressed by its own key: the genotypes, covariates, options,
versions and the trait's values. A trait whose key has a stored result is not run
again, so a rerun with one trait changed computes that trait only, and added traits
only themselves. Traits too sparse or constant to scan are skipped, with the reason.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ... import __version__
from ...cache import Cache
from ...config import Settings
from ...errors import ConfigError, InputError
from ...jobs import check_backend, new_job_id
from ...models import Job, Task
from ...params import Param, Params
from ..commands import check_gemma_flags, version
from ..formats import bimbam, traits
from ..scan.build import MAF, OPS, GemmaRequest, Prepared, covariate_blob, gemma_task, genotypes
from ..scan.build import kinship_tasks as make_kinship_tasks
from . import store as pcstore
from .steps import P_COLUMNS, VECTOR

MIN_VALUES = 10  # fewer measured individuals than this: skipped, not scanned
# a precompute's request parameters, each declared once (see sheepdog.params)
PRECOMPUTE_PARAMS = Params(
    Param("traits", list, [], "Only these traits (their ids; on the command line "
          "--traits ID,...).", cli=False),
    Param("sample", int, None, "A reproducible sample of N traits.", minimum=1),
    Param("seed", int, 0, "The seed of --sample."),
    MAF,
    Param("test", str, "lrt", "The p-value stored and used for peaks.",
          choices=tuple(P_COLUMNS)),
    Param("threshold", float, 4.0, "-log10 p of a peak."),
    Param("min_values", int, MIN_VALUES, "Skip traits measured on fewer individuals.",
          minimum=2),
    Param("batch_size", int, 25, "Traits per piece.", minimum=1),
    Param("force", bool, False, "Recompute traits already computed.", recorded=False),
)


@dataclass
class PrecomputeRequest:
    """`sheepdog run gemma-precompute ...` or its POST /jobs body."""

    geno: Path
    pheno: Path | None = None
    anno: Path | None = None
    covariates: Path | None = None
    traits: list[str] = field(default_factory=list)  # only these (default: every trait)
    sample: int | None = None
    seed: int = 0
    test: str = "lrt"
    threshold: float = 4.0
    min_values: int = MIN_VALUES
    batch_size: int = 25
    name: str = ""
    out_dir: str = ""
    force: bool = False
    gemma_flags: list[str] = field(default_factory=list)
    backend: str = "local"
    host: str = ""
    queue: str = ""
    options: dict[str, Any] = field(default_factory=dict)  # declared, not fields (-maf ...)
    confine: tuple[str, ...] = ()  # as GemmaRequest.confine

    @classmethod
    def of(cls, values: dict[str, Any], **given: Any) -> PrecomputeRequest:
        """From declared values: those a field names, and the rest in `options`."""
        fields = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in fields}, **given,
                   options={k: v for k, v in values.items() if k not in fields})

    def declared(self) -> dict[str, Any]:
        return {p.name: getattr(self, p.name, self.options.get(p.name, p.default))
                for p in PRECOMPUTE_PARAMS}

    def gemma_options(self) -> list[str]:
        return PRECOMPUTE_PARAMS.gemma_flags(self.declared())

    def check(self) -> None:
        PRECOMPUTE_PARAMS.check(self.declared())
        if not self.out_dir:
            raise ConfigError("--out DIR is needed: the dataset's store is written there")
        if not pcstore.valid_name(self.dataset_name()):
            raise ConfigError(f"dataset name {self.dataset_name()!r}: use letters, digits, "
                              "'.', '_' and '-' (--name)")
        self.gemma_flags = check_gemma_flags(self.gemma_flags,
                                             PRECOMPUTE_PARAMS.gemma_advice())
        check_backend(self.backend, self.host)

    def dataset_name(self) -> str:
        return self.name or Path(self.out_dir).resolve().name


def _choose(names: list[str], wanted: list[str], sample: int | None, seed: int,
            source: Path) -> list[int]:
    """Column numbers of the traits to run, in the table's order."""
    if wanted:
        where = {n: i for i, n in enumerate(names)}
        missing = [w for w in wanted if w not in where]
        if missing:
            raise InputError(str(source), f"--traits names {', '.join(map(repr, missing[:5]))},"
                             f" not in the trait table's header")
        chosen = sorted({where[w] for w in wanted})
    else:
        chosen = list(range(len(names)))
    if sample is not None and sample < len(chosen):
        chosen = sorted(random.Random(seed).sample(chosen, sample))
    return chosen


def _skip_reason(values: np.ndarray, minimum: int) -> str:
    measured = values[~np.isnan(values)]
    if len(measured) < minimum:
        return f"only {len(measured)} measured individuals (at least {minimum} needed)"
    if float(measured.min()) == float(measured.max()):
        return f"constant: every measured value is {traits.text(measured[0])}"
    return ""


def _trait_key(basis: str, values: list[str]) -> str:
    return hashlib.sha256((basis + "\n" + "\t".join(values)).encode()).hexdigest()


def _batches(todo: list[dict[str, Any]], size: int, workers_hint: int = 4
             ) -> list[list[dict[str, Any]]]:
    """Traits measured on the same individuals together (they share the cut files);
    batches no larger than `size`, and at least a few per worker when there is work."""
    todo = sorted(todo, key=lambda t: t["mask"])
    size = max(1, min(size, math.ceil(len(todo) / workers_hint) if todo else size))
    return [todo[i:i + size] for i in range(0, len(todo), size)]


def build_job(request: PrecomputeRequest, settings: Settings, cache: Cache,
              job_id: str | None = None) -> tuple[Job, list[Task]]:
    """Validate every input before any compute, and expand into pieces."""
    request.check()
    gemma_request = GemmaRequest(geno=request.geno, pheno=request.pheno, anno=request.anno,
                                 covariates=request.covariates, backend=request.backend,
                                 host=request.host, queue=request.queue,
                                 confine=request.confine)
    found, hashes, known = genotypes(gemma_request, cache, settings.max_chromosomes)
    pheno = request.pheno or (found.control.pheno if found.control else None)
    if pheno is None:
        raise InputError(str(request.geno), "no trait table: give -p TRAITS")
    if not pheno.is_file():
        raise InputError(str(pheno), "trait table does not exist or is not a file")
    table = found.traits(pheno)
    covariates = covariate_blob(request.covariates, cache, found)
    chosen = _choose(table.traits, request.traits, request.sample, request.seed, pheno)
    order = sorted(known["chromosomes"], key=bimbam.chromosome_order)
    prep = Prepared(int(known["individuals"]), int(known["snps"]), known["chromosomes"],
                    hashes, {}, [], order)
    gemma_version = version(cache_dir=cache.root / "versions")
    env = f"gemma {gemma_version}; sheepdog {__version__}; guix none"
    declared = request.declared()
    options = {**{p.name: declared[p.name] for p in PRECOMPUTE_PARAMS if p.gemma},
               "test": request.test, "threshold": request.threshold,
               "gemma_flags": request.gemma_flags, "lmm": 9}
    basis = json.dumps({"chromosomes": {c: known["chromosomes"][c]["geno"] for c in order},
                        "covariates": covariates[1] if covariates else None,
                        "options": options, "env": env,
                        "vector": VECTOR.descr}, sort_keys=True)
    entries, todo = _entries(table, chosen, basis, request, cache)
    tasks, batch_tasks = _tasks(prep, todo, request, gemma_request, settings, cache, env,
                                covariates[1] if covariates else None)
    params = {
        "dataset": request.dataset_name(),
        "inputs": {role: {"path": str(getattr(request, role) or request.geno), "sha256": sha}
                   for role, sha in {**hashes, "pheno": _sha(pheno)}.items()},
        "formats": found.kind, "options": options, "gemma_version": gemma_version,
        "individuals": prep.individuals, "snps": prep.snps, "chromosomes": order,
        "genotyped_without_values": table.without_values,
        "traits_total": len(table.traits), "traits_chosen": len(entries),
        "traits_to_run": len(todo), "traits_blob": cache.put_bytes(json.dumps(entries).encode()),
        "prepare_task": tasks[len(order)].id, "batches": batch_tasks,
        "environment": env,
    }
    if request.force:  # the batches too, not only the traits' own results
        params["forced"] = list(batch_tasks)
    job = Job(id=job_id or new_job_id(), workflow="gemma-precompute", params=params,
              backend=request.backend, host=request.host,
              queue=request.queue or settings.queue,
              out_dir=str(Path(request.out_dir).resolve()), final_task=tasks[-1].id)
    return job, tasks


def _entries(table: Any, chosen: list[int], basis: str, request: PrecomputeRequest,
             cache: Cache) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(every chosen trait's entry, those to run: neither skipped nor already stored)."""
    entries, todo = [], []
    for column in chosen:
        values = table.values[:, column]
        texts = [traits.text(v) for v in values]
        entry: dict[str, Any] = {"id": table.traits[column], "key": _trait_key(basis, texts),
                                 "n": int(np.count_nonzero(~np.isnan(values)))}
        reason = _skip_reason(values, request.min_values)
        if reason:
            entry.update(status="skipped", reason=reason)
        elif request.force or not pcstore.cached(cache, entry["key"]):
            todo.append({**entry, "values": texts, "mask": "".join(
                "0" if t == "NA" else "1" for t in texts)})
        entries.append(entry)
    return entries, todo


def _sha(path: Path) -> str:
    from ...cache import sha256_file

    return sha256_file(path)


def _tasks(prep: Prepared, todo: list[dict[str, Any]], request: PrecomputeRequest,
           gemma_request: GemmaRequest, settings: Settings, cache: Cache, env: str,
           covariates: str | None) -> tuple[list[Task], list[str]]:
    """(every task, kinships then prepare first and the summary last; the batch ids)."""
    kinships = make_kinship_tasks(prep, gemma_request, settings, env)
    inputs: dict[str, str] = {}
    argv: list[Any] = [{"python": True}, *OPS, "pc-prepare"]
    chrom_args: list[Any] = []
    for chrom in prep.order:
        c = prep.chromosomes[chrom]
        for part in ("geno", "anno", "matrix"):
            inputs[f"{part}.{chrom}"] = c[part]
        argv += [chrom, {"input": f"geno.{chrom}"}, {"input": f"anno.{chrom}"},
                 {"dep": kinships[chrom].id, "file": "."}]
        chrom_args += [chrom, {"input": f"geno.{chrom}"}, {"input": f"anno.{chrom}"},
                       {"input": f"matrix.{chrom}"}]
    prepare = gemma_task("precompute prep", argv, {k: v for k, v in inputs.items()
                                                   if not k.startswith("matrix.")},
                         [k.id for k in kinships.values()], ["meta.json", "snps.npy"], env,
                         gemma_request, settings)
    batches = []
    for number, members in enumerate(_batches(todo, request.batch_size), start=1):
        spec = {"ids": [m["id"] for m in members], "keys": [m["key"] for m in members],
                "values": [m["values"] for m in members]}
        batch_inputs = dict(inputs, traits=cache.put_bytes(json.dumps(spec).encode()))
        bargv: list[Any] = [{"python": True}, *OPS, "pc-batch",
                            "--prepared", {"dep": prepare.id, "file": "."},
                            "--traits", {"input": "traits"}, "--test", request.test,
                            "--threshold", repr(request.threshold)]
        if covariates:
            batch_inputs["covariates"] = covariates
            bargv += ["--covariates", {"input": "covariates"}]
        bargv += ["--gemma-flags", json.dumps(request.gemma_options() + request.gemma_flags)]
        bargv += ["--", *chrom_args]
        batches.append(gemma_task(
            f"traits batch {number} ({len(members)} traits: {members[0]['id']}...)", bargv,
            batch_inputs, [prepare.id], ["vectors.npy", "batch.json"], env, gemma_request,
            settings))
    summary_argv: list[Any] = [{"python": True}, *OPS, "pc-summary",
                               {"dep": prepare.id, "file": "meta.json"}]
    summary_argv += [{"dep": b.id, "file": "batch.json"} for b in batches]
    summary = gemma_task("precompute summary", summary_argv, {},
                         [prepare.id, *(b.id for b in batches)], ["summary.json"], env,
                         gemma_request, settings)
    return [*kinships.values(), prepare, *batches, summary], [b.id for b in batches]
