"""`gemma-precompute` as sheepdog sees it: `sheepdog run gemma-precompute`, its POST
/jobs body, each batch stored as it finishes, the dataset registered for `serve`, and
`sheepdog precompute show|hits|export`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import redis

from ... import __version__, jobs, store
from ...cache import Cache
from ...config import Settings
from ...connection import connect
from ...errors import ConfigError, FieldError, InputError
from ...models import Job, JobStatus, Task
from ...workflows.base import CliServices, InputResolver, WebServices, Workflow
from ..scan.plugin import EXAMPLE, as_field, confined
from . import store as pcstore
from .build import PRECOMPUTE_PARAMS, PrecomputeRequest, build_job
from .registry import check_owner, register

ROLES = ("geno", "pheno", "anno", "covariates")


# ------------------------------------------------------------------ the dataset's record
def _meta(job: Job) -> dict[str, Any]:
    """What every trait's metadata record says about how it was computed."""
    return {"dataset": job.params["dataset"], "job": job.id,
            "gemma_version": job.params["gemma_version"], "sheepdog_version": __version__,
            "inputs": job.params["inputs"], "options": job.params["options"], "guix": "none"}


def _store_batch(settings: Settings, job: Job, task_id: str) -> None:
    cache = Cache(settings.cache_dir)
    batch_dir = cache.task_dir(task_id)
    records = pcstore.index_batch(cache, batch_dir, _meta(job))
    snps = cache.task_dir(job.params["prepare_task"]) / "snps.npy"
    pcstore.add(Path(job.out_dir), cache, records, snps)


def begin(settings: Settings, job: Job, cache: Cache) -> None:
    """The dataset's store, before any compute: queued, skipped and cached traits."""
    entries = json.loads(cache.blob(job.params["traits_blob"]).read_text())
    description = {k: job.params[k] for k in ("dataset", "inputs", "options", "gemma_version",
                                               "individuals", "snps", "chromosomes",
                                               "traits_total", "traits_chosen")}
    description["job"] = job.id
    pcstore.begin(Path(job.out_dir), cache, description, entries, _meta(job))


# ------------------------------------------------------------------ the command line
def _inputs(fn: Any) -> Any:
    for opt in reversed([
        click.option("-g", "geno", type=click.Path(path_type=Path), default=None,
                     help="Genotypes: GN .geno, BIMBAM (with -a), or an R/qtl2 control file."),
        click.option("--control", type=click.Path(path_type=Path), default=None,
                     help="An R/qtl2 control file (its pheno is the trait table)."),
        click.option("-p", "pheno", type=click.Path(path_type=Path), default=None,
                     help="Trait table: 'id, trait1, trait2...' (TSV/CSV, NA missing)."),
        click.option("-a", "anno", type=click.Path(path_type=Path), default=None,
                     help="SNP annotation, for BIMBAM genotypes."),
        click.option("-c", "covariates", type=click.Path(path_type=Path), default=None,
                     help="Covariates: 'id, cov1...' (an intercept is added) or BIMBAM."),
        click.option("--traits", "trait_list", default="", metavar="ID,...",
                     help="Only these traits."),
        PRECOMPUTE_PARAMS.options,
        click.option("--name", default="", help="Dataset name (default: --out's name)."),
        click.option("--out", "out_dir", type=click.Path(), required=True,
                     help="The dataset's directory (SQLite store, vectors, hits.tsv)."),
        click.option("--example", is_flag=True,
                     help="Use the bundled BXD example: a GN .geno and a trait table of "
                          "two traits (-g/-p)."),
        click.option("--lmdb", default="", metavar="DIR",
                     help="Also write each scanned trait as gemma2lmdb's LMDB file, "
                          "DIR/<trait>.mdb."),
        click.argument("gemma_flags", nargs=-1, type=click.UNPROCESSED),
    ]):
        fn = opt(fn)
    return fn


def _request(kw: dict[str, Any]) -> PrecomputeRequest:
    if kw.pop("example"):
        kw["geno"] = kw["geno"] or EXAMPLE / "BXD.geno.gz"
        kw["pheno"] = kw["pheno"] or EXAMPLE / "BXD_traits.tsv"
    control = kw.pop("control")
    if control is not None and kw["geno"] is not None:
        raise click.UsageError("give -g or --control, not both")
    kw["geno"] = kw["geno"] or control
    if kw["geno"] is None:
        raise click.UsageError("missing -g GENOTYPES (or --control FILE)")
    wanted = [t.strip() for t in kw.pop("trait_list").split(",") if t.strip()]
    host, queue, flags = kw.pop("host") or "", kw.pop("queue") or "", kw.pop("gemma_flags")
    return PrecomputeRequest.of(kw, traits=wanted, host=host, queue=queue,
                                gemma_flags=list(flags))


def run_cli(cli: CliServices, kw: dict[str, Any]) -> int:
    detach, as_json, lmdb = kw.pop("detach"), kw.pop("as_json"), kw.pop("lmdb")
    if kw.pop("race") or kw.pop("complete_all"):
        raise click.UsageError("--race is for single scans, not a precompute")
    if lmdb and detach:
        raise click.UsageError("--lmdb writes when the job ends: not with --detach (run "
                               "`sheepdog precompute lmdb OUT DIR` after it)")
    settings = cli.settings()
    request = _request(kw)
    cache = Cache(settings.cache_dir)
    db = cli.conn(settings)
    job, tasks = build_job(request, settings, cache)
    begin(settings, job, cache)
    register(db, job)
    p = job.params
    click.echo(f"[sheepdog] {p['traits_chosen']:,d} of {p['traits_total']:,d} traits; "
               f"{p['traits_to_run']:,d} to scan, the rest stored or skipped"
               + (f"; {p['genotyped_without_values']} genotyped individuals have no values"
                  if p["genotyped_without_values"] else ""), err=True)
    jobs.submit(db, settings, job, tasks)  # with --force, forgets the batches first
    if not detach:
        cli.finalize(db, settings, job.id)  # a fully stored dataset ends right here
    code = cli.finish(db, settings, job.id, job.queue, detach, as_json,
                      after_wait=cli.finalize)
    if not detach:
        counts = pcstore.counts(Path(job.out_dir))
        click.echo(f"[sheepdog] dataset {p['dataset']} in {job.out_dir}: "
                   + ", ".join(f"{n:,d} {s}" for s, n in sorted(counts.items())), err=True)
    if lmdb and code == 0:
        written = pcstore.write_lmdb(Path(job.out_dir), Path(lmdb))
        click.echo(f"[sheepdog] {len(written)} traits as gemma2lmdb files in {lmdb}", err=True)
    return code


def _out(path: str) -> Path:
    out = Path(path)
    if not (out / pcstore.DB).is_file():
        raise click.UsageError(f"{out} holds no precomputed dataset ({pcstore.DB})")
    return out


def command_group(cli: CliServices) -> click.Group:
    """`sheepdog precompute show|hits|export|lmdb`: reading a dataset's directory."""
    @click.group("precompute")
    def precompute_group() -> None:
        """Read a precomputed dataset: a trait's scan, the traits with a QTL in a region."""


    @precompute_group.command("show")
    @click.argument("out")
    @click.argument("trait")
    @click.option("--json", "as_json", is_flag=True)
    @click.option("--vector", is_flag=True, help="Every SNP: rs chr ps logp beta se af.")
    def show_cmd(out: str, trait: str, as_json: bool, vector: bool) -> None:
        """A trait's metadata and peaks (with --vector, its full scan)."""
        try:
            found = pcstore.show(_out(out), trait, vector)
        except FieldError as e:
            click.echo(f"sheepdog: {e.problem}", err=True)
            sys.exit(1 if e.http_status == 409 else 2)
        if as_json:
            cli.print_json(found)
            return
        top = found["top"]
        click.echo(f"{trait}: n {found['n']}; top {top['locus']} chr {top['chr']} "
                   f"{top['mb']:.3f} Mb -log10 p {top['logp']:.2f} effect {top['effect']:.4g}")
        for p in found["peaks"]:
            click.echo(f"  peak chr {p['chr']} {p['locus']} {p['mb']:.3f} Mb  {p['logp']:.2f}")
        for s in found.get("snps", []):
            click.echo(f"{s['rs']}\t{s['chr']}\t{s['ps']}\t{s['logp']}\t{s['beta']}\t{s['se']}\t"
                       f"{s['af']}")


    @precompute_group.command("hits")
    @click.argument("out")
    @click.option("--chr", "chrom", default=None)
    @click.option("--start", type=float, default=None, help="Mb")
    @click.option("--end", type=float, default=None, help="Mb")
    @click.option("--min", "minimum", type=float, default=None, help="-log10 p at least")
    @click.option("--limit", type=click.IntRange(1), default=1000, show_default=True)
    @click.option("--json", "as_json", is_flag=True)
    def hits_cmd(out: str, chrom: str | None, start: float | None, end: float | None,
                 minimum: float | None, limit: int, as_json: bool) -> None:
        """Traits with a peak in a region, strongest first."""
        found = pcstore.hits(_out(out), chrom, start, end, minimum, limit)
        if as_json:
            cli.print_json(found)
            return
        for h in found["hits"]:
            click.echo(f"{h['trait']}\t{h['locus']}\t{h['chr']}\t{h['mb']:.6f}\t{h['logp']:.4f}\t"
                       f"{h['effect']:.6g}")


    @precompute_group.command("export")
    @click.argument("out")
    def export_cmd(out: str) -> None:
        """Rewrite OUT/hits.tsv from the dataset's store."""
        rows = pcstore.export_hits(_out(out))
        click.echo(f"{rows:,d} traits written to {Path(out) / 'hits.tsv'}")


    @precompute_group.command("lmdb")
    @click.argument("out")
    @click.argument("folder")
    def lmdb_cmd(out: str, folder: str) -> None:
        """Write each scanned trait of OUT as gemma2lmdb's LMDB file, FOLDER/<trait>.mdb."""
        written = pcstore.write_lmdb(_out(out), Path(folder))
        click.echo(f"{len(written):,d} traits written to {folder}")

    return precompute_group


# ------------------------------------------------------------------ the workflow
class PrecomputeWorkflow(Workflow):
    """GEMMA LOCO scans of every trait of a dataset, stored and served by key."""

    name = "gemma-precompute"
    summary = "GEMMA LOCO scans of every trait of a dataset, stored and served by trait."
    reads_inputs = True
    result_files = {"hits.tsv": "text/tab-separated-values"}

    def command(self, cli: CliServices) -> click.Command:
        def run(**kw: Any) -> None:
            sys.exit(run_cli(cli, kw))

        run.__doc__ = self.summary
        return click.command(self.name, help=self.summary)(cli.backend_options(_inputs(run)))

    def commands(self, cli: CliServices) -> list[click.Command]:
        return [command_group(cli)]

    def blueprint(self, web: WebServices) -> Any:
        from .web import routes

        return routes(web)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow", "name"], "properties": {
            "workflow": {"const": self.name},
            "name": {"type": "string", "description": "the dataset's name; stored under "
                     "SHEEPDOG_HOME/precompute/NAME"},
            "inputs": {"type": "object", "properties": {r: {"type": "string"} for r in ROLES}},
            "params": PRECOMPUTE_PARAMS.schema()}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        name = body.get("name")
        if not isinstance(name, str) or not pcstore.valid_name(name):
            raise FieldError("name", "must be a dataset name: letters, digits, '.', '_', '-'")
        params = PRECOMPUTE_PARAMS.parse(body.get("params"))  # before any file is opened
        conn = connect(settings)
        check_owner(conn, name, owner)  # before anything is written into it
        paths = inputs(body.get("inputs", {}), ROLES, ("geno",))
        request = PrecomputeRequest.of(
            params, geno=paths["geno"], pheno=paths.get("pheno"), anno=paths.get("anno"),
            covariates=paths.get("covariates"),
            name=name, out_dir=str(settings.home / "precompute" / name),
            backend=body.get("backend") or "local", host=body.get("host") or "",
            queue=body.get("queue") or "", confine=confined(paths, settings))
        try:
            job, tasks = build_job(request, settings, cache)
        except InputError as e:
            raise as_field(e, paths) from e
        except ConfigError as e:
            raise FieldError("params", str(e)) from e
        job.owner = owner
        register(conn, job)  # the name is this token's from now on
        begin(settings, job, cache)
        return job, tasks

    def piece_done(self, conn: redis.Redis, settings: Settings, job: Job, task: Task,
                   totals: dict[str, int] | None = None) -> None:
        register(conn, job)
        if task.id in job.params["batches"]:
            _store_batch(settings, job, task.id)

    def finalize(self, conn: redis.Redis, settings: Settings, job: Job) -> None:
        for task_id in job.params["batches"]:
            _store_batch(settings, job, task_id)  # again: idempotent, and cheap
        register(conn, job)
        out = Path(job.out_dir)
        # every trait may have come from the cache (a rerun after a kill): no batch ran
        # to put the SNPs beside their vectors
        pcstore.add(out, Cache(settings.cache_dir), [],
                    Cache(settings.cache_dir).task_dir(job.params["prepare_task"]) / "snps.npy")
        rows = pcstore.export_hits(out)
        store.set_job_fields(conn, job.id, result={"dataset": job.params["dataset"],
                                                   "out": job.out_dir, "hits": rows,
                                                   "traits": pcstore.counts(out)})

    def describe(self, conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
        out = Path(job.out_dir)
        return {"id": job.id, "status": job.status, "dataset": job.params["dataset"],
                "out": job.out_dir, "traits": pcstore.counts(out) if out.is_dir() else {},
                "result": job.result}

    def export(self, conn: redis.Redis, settings: Settings, job: Job,
               out_dir: Path) -> dict[str, Any]:
        if out_dir.resolve() != Path(job.out_dir):
            raise FieldError("out", f"a precompute's store is {job.out_dir}; copy that "
                             "directory (it holds everything)")
        pcstore.export_hits(out_dir)
        return self.describe(conn, settings, job)

    def result_file(self, settings: Settings, job: Job, name: str) -> Path:
        if name != "hits.tsv":
            raise FieldError("name", f"no result file {name!r}; available: hits.tsv", 404)
        path = Path(job.out_dir) / "hits.tsv"
        if job.status != JobStatus.SUCCESS or not path.is_file():
            raise FieldError("name", "hits.tsv is written when the job succeeds", 404)
        return path
