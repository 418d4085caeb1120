"""A finished GEMMA job's result: result.json (gemma-wrapper's names where they fit)
and the merged files, written into the user's --out directory."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import redis

from ... import store
from ...cache import Cache
from ...config import Settings
from ...models import Job, Task
from .merge import lmm_chromosome


def piece_files(tasks: list[Task], local: Cache) -> list[list[str | None]]:
    """[chromosome, log, assoc] per LMM piece, like gemma-wrapper's `files` (the
    chromosome None for the one piece of a scan without LOCO, as its record has it)."""
    files: list[list[str | None]] = []
    for t in tasks:
        chromosome = lmm_chromosome(t.name)
        if chromosome is not None:
            d = local.task_dir(t.id) / "output"
            files.append([chromosome or None, str(d / "lmm.log.txt"), str(d / "lmm.assoc.txt")])
    return files


def describe(conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
    """result.json for a successful job."""
    local = Cache(settings.cache_dir)
    tasks = store.job_tasks(conn, job.id)
    scan_dir = local.task_dir(job.params["scan_task"])
    summary = json.loads((scan_dir / "summary.json").read_text())
    facts = summary["facts"]
    timings = {t.name: round(t.ended - t.started, 3) for t in tasks
               if t.ended and t.started and t.ended >= t.started}
    result: dict[str, Any] = {
        "type": "GWA",
        "workflow": job.workflow,
        "job": job.id,
        "errno": 0,
        "warnings": [],
        "cache_hit": job.total > 0 and job.cached == job.total,
        "pieces_cached": job.cached,
        "pieces": job.total,
        "gemma_version": job.params["gemma_version"],
        "gemma_command": next((t.argv for t in tasks if lmm_chromosome(t.name) is not None),
                              []),
        "inputs": job.params["inputs"],
        "options": job.params["options"],
        "files": piece_files(tasks, local),
        "counts": {"individuals": job.params["individuals"],
                   "analysed_individuals": int(facts.get("individuals") or 0),
                   "snps": job.params["snps"], "analysed_snps": summary["snps"],
                   "chromosomes": len(summary["chromosomes"])},
        "p_column": summary["p_column"],
        "top_hits": summary["top_hits"],
        "timings": {"wall_seconds": round((job.ended or time.time()) - job.submitted, 3),
                    "pieces": timings},
    }
    if job.workflow == "gemma-permute":
        perm = json.loads((local.task_dir(job.params["permutation_task"])
                           / "permutations.json").read_text())
        result["permutations"] = {k: v for k, v in perm.items() if k != "minima"}
        result["permutations"]["seed"] = job.params["seed"]
    return result


def _atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _atomic_write(text: str, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, dst)


def export(conn: redis.Redis, settings: Settings, job: Job, out_dir: Path) -> dict[str, Any]:
    """Write assoc.txt, result.json, manhattan.png/.svg (and permutations.json)."""
    local = Cache(settings.cache_dir)
    result = describe(conn, settings, job)
    out_dir.mkdir(parents=True, exist_ok=True)
    scan_dir = local.task_dir(job.params["scan_task"])
    for name in ("assoc.txt", "manhattan.png", "manhattan.svg"):
        _atomic_copy(scan_dir / name, out_dir / name)
    if job.workflow == "gemma-permute":
        perm_dir = local.task_dir(job.params["permutation_task"])
        _atomic_copy(perm_dir / "permutations.json", out_dir / "permutations.json")
        _with_thresholds(scan_dir / "assoc.txt", out_dir, result["permutations"])
    _atomic_write(json.dumps(result, indent=2) + "\n", out_dir / "result.json")
    return result


def _with_thresholds(assoc: Path, out_dir: Path, perm: dict[str, Any]) -> None:
    from .plot import manhattan

    manhattan(assoc, out_dir / "manhattan", title="GEMMA LOCO scan with permutation thresholds",
              thresholds={"significant": perm["significant"], "suggestive": perm["suggestive"]})


def write_lmdb(conn: redis.Redis, settings: Settings, job: Job, db: Path) -> dict[str, Any]:
    """The merged scan as gemma2lmdb's LMDB (see lmdbout), the pieces' GEMMA logs in it."""
    from . import lmdbout

    local = Cache(settings.cache_dir)
    logs = {}
    for chrom, log, _assoc in piece_files(store.job_tasks(conn, job.id), local):
        logs[f"chr {chrom}" if chrom else "all SNPs"] = Path(str(log)).read_text(
            errors="replace")
    return lmdbout.write(local.task_dir(job.params["scan_task"]) / "assoc.txt", db, logs)


def finalize(conn: redis.Redis, settings: Settings, job: Job) -> None:
    """Record the compact result on the job, and export to its --out directory if any."""
    if job.out_dir:
        result = export(conn, settings, job, Path(job.out_dir))
    else:
        result = describe(conn, settings, job)
    if job.params.get("lmdb"):
        meta = write_lmdb(conn, settings, job, Path(job.params["lmdb"]))
        result["lmdb"] = {"path": job.params["lmdb"], "hits": len(meta["hits"])}
    compact: dict[str, Any] = {k: result[k] for k in ("cache_hit", "counts", "top_hits",
                                                      "p_column", "gemma_version", "lmdb")
                               if k in result}
    if "permutations" in result:
        compact["permutations"] = result["permutations"]
    store.set_job_fields(conn, job.id, result=compact)
