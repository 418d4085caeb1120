"""`sheepdog run gemma-loco` and `sheepdog run gemma-permute`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import store
from ..cache import Store
from ..cli import _conn, _print_json, _settings, backend_options, cli, finish, run, run_race
from ..finalize import finalize
from ..models import JobStatus
from ..workflow import submit
from .result import export
from .workflows import GemmaRequest, build_job

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "bxd"


def gemma_inputs(fn: Any) -> Any:
    for opt in reversed([
        click.option("-g", "geno", type=click.Path(path_type=Path),
                     help="BIMBAM mean genotype file (plain or .gz)."),
        click.option("-p", "pheno", type=click.Path(path_type=Path),
                     help="Phenotype file, one row per individual."),
        click.option("-a", "anno", type=click.Path(path_type=Path),
                     help="SNP annotation: rs position chromosome."),
        click.option("-c", "covariates", type=click.Path(path_type=Path), default=None,
                     help="Covariates file (first column the intercept)."),
        click.option("-n", "column", type=int, default=None, help="Phenotype column (1-based)."),
        click.option("--lmm", type=int, default=9, show_default=True, help="GEMMA -lmm mode."),
        click.option("--maf", type=float, default=0.1, show_default=True, help="GEMMA -maf."),
        click.option("--example", is_flag=True,
                     help="Use the bundled BXD example for -g/-p/-a (and -c if not given)."),
        click.option("--out", "out_dir", type=click.Path(), default="",
                     help="Directory for assoc.txt, result.json and the Manhattan plot."),
        click.option("--force", is_flag=True, help="Recompute instead of using the cache."),
    ]):
        fn = opt(fn)
    return fn


def _request(kw: dict[str, Any]) -> GemmaRequest:
    if kw.pop("example"):
        kw["geno"] = kw["geno"] or EXAMPLE / "BXD_geno.txt.gz"
        kw["pheno"] = kw["pheno"] or EXAMPLE / "BXD_pheno.txt"
        kw["anno"] = kw["anno"] or EXAMPLE / "BXD_snps.txt"
    missing = [flag for flag, key in (("-g", "geno"), ("-p", "pheno"), ("-a", "anno"))
               if not kw.get(key)]
    if missing:
        raise click.UsageError(f"missing {', '.join(missing)} (or use --example)")
    kw["host"] = kw.get("host") or ""
    kw["queue"] = kw.get("queue") or ""
    return GemmaRequest(**kw)


def _run(kw: dict[str, Any]) -> None:
    detach, as_json = kw.pop("detach"), kw.pop("as_json")
    race, complete_all = kw.pop("race"), kw.pop("complete_all")
    settings = _settings()
    request = _request(kw)
    local = Store(settings.store_dir)
    if race:
        out_dir = request.out_dir
        run_race(settings, race, complete_all, request.queue or settings.queue,
                 lambda: build_job(request, settings, local),
                 after=lambda conn, s, winner, label: _race_won(conn, s, winner, label, out_dir))
    conn = _conn(settings)
    job, tasks = build_job(request, settings, local)
    if request.force:
        store.forget(conn, [t.id for t in tasks], local.remove)
    submit(conn, settings, job, tasks)
    if not detach:
        finalize(conn, settings, job.id)  # a fully cached job ends right here
    finish(conn, settings, job.id, job.queue, detach, as_json, after_wait=_after)


def _race_won(conn: Any, settings: Any, winner: Any, label: str, out_dir: str) -> None:
    finalize(conn, settings, winner.id)  # the compact result, if no worker wrote it yet
    if out_dir:
        store.set_job_fields(conn, winner.id, out_dir=str(Path(out_dir).resolve()))
        export(conn, settings, store.get_job(conn, winner.id), Path(out_dir))
    click.echo(f"results of lane {label} in {out_dir or 'the cache'}", err=True)


def _after(conn: Any, settings: Any, job_id: str) -> None:
    finalize(conn, settings, job_id)
    job = store.get_job(conn, job_id)
    if job.status == JobStatus.SUCCESS.value and job.out_dir:
        click.echo(f"results in {job.out_dir}", err=True)


@run.command("gemma-loco")
@gemma_inputs
@backend_options
def gemma_loco(**kw: Any) -> None:
    """A GEMMA LOCO genome scan, split per chromosome, cached, merged into --out."""
    kw["permutations"] = 0
    _run(kw)


@run.command("gemma-permute")
@gemma_inputs
@backend_options
@click.option("--permutations", type=int, default=1000, show_default=True)
@click.option("--seed", type=int, default=None, help="Makes the permutations reproducible.")
@click.option("--batch-size", type=int, default=25, show_default=True,
              help="Permutations per piece.")
def gemma_permute(**kw: Any) -> None:
    """Permutation thresholds (significant 95%, suggestive 67%) for a LOCO scan."""
    if kw["permutations"] < 1:
        raise click.UsageError("--permutations must be at least 1")
    _run(kw)


@cli.command()
@click.argument("job_id")
@click.option("--out", "out_dir", type=click.Path(), default=None,
              help="Write the result files here too.")
def result(job_id: str, out_dir: str | None) -> None:
    """Print a finished GEMMA job's result.json (and write its files to --out)."""
    settings = _settings()
    conn = _conn(settings)
    job = store.get_job(conn, job_id)
    if job.status != JobStatus.SUCCESS.value or not job.workflow.startswith("gemma"):
        raise click.ClickException(f"job {job_id} is {job.status}, not a finished GEMMA job")
    from .result import describe

    _print_json(export(conn, settings, job, Path(out_dir)) if out_dir
                else describe(conn, settings, job))
