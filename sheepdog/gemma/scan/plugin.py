"""The GEMMA workflows as sheepdog sees them: `gemma-loco`, `gemma` (no LOCO) and
`gemma-permute`, each declared by its own module in sheepdog.workflows with an instance
of this class."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import redis

from ... import jobs, store
from ...cache import Cache
from ...config import Settings
from ...errors import ConfigError, FieldError, InputError
from ...models import Job, JobStatus, Task
from ...params import Params
from ...workflows.base import CliServices, InputResolver, Workflow
from ..formats import convert as formats
from . import result
from .build import PERMUTATION_PARAMS, SCAN_PARAMS, GemmaRequest, build_job

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "bxd"
ROLES = ("geno", "pheno", "anno", "covariates")
REQUIRED = ("geno",)  # pheno from an R/qtl2 control file, anno for BIMBAM only
SCAN_FILES = {"assoc.txt": "text/plain", "manhattan.png": "image/png",
              "manhattan.svg": "image/svg+xml", "summary.json": "application/json"}


def gemma_inputs(fn: Any) -> Any:
    for opt in reversed([
        click.option("-g", "geno", type=click.Path(path_type=Path),
                     help="Genotypes: BIMBAM mean genotypes, GN .geno, or an R/qtl2 control "
                          "file (YAML/JSON); plain or .gz."),
        click.option("--control", "control", type=click.Path(path_type=Path), default=None,
                     help="An R/qtl2 control file (the same as -g FILE.yaml)."),
        click.option("-p", "pheno", type=click.Path(path_type=Path),
                     help="Phenotypes: one row per individual (BIMBAM), or a table with a "
                          "header 'id, trait...' matched by id."),
        click.option("-a", "anno", type=click.Path(path_type=Path),
                     help="SNP annotation for BIMBAM genotypes: rs position chromosome."),
        click.option("-c", "covariates", type=click.Path(path_type=Path), default=None,
                     help="Covariates file (first column the intercept)."),
        click.option("--example", is_flag=True,
                     help="Use the bundled BXD example for -g/-p/-a (and -c if not given)."),
        click.option("--out", "out_dir", type=click.Path(), default="",
                     help="Directory for assoc.txt, result.json and the Manhattan plot."),
        click.option("--lmdb", default="", metavar="FILE",
                     help="Also write the merged scan as gemma2lmdb's LMDB file."),
        click.option("--verbose", "-v", is_flag=True,
                     help="Print GEMMA's own lines as they come (else only its errors and "
                          "warnings; `sheepdog logs JOB` has them all)."),
        click.argument("gemma_flags", nargs=-1, type=click.UNPROCESSED),
    ]):
        fn = opt(fn)
    return fn


def _request(kw: dict[str, Any], params: Params) -> GemmaRequest:
    if kw.pop("example"):
        kw["geno"] = kw["geno"] or EXAMPLE / "BXD_geno.txt.gz"
        kw["pheno"] = kw["pheno"] or EXAMPLE / "BXD_pheno.txt"
        kw["anno"] = kw["anno"] or EXAMPLE / "BXD_snps.txt"
    control = kw.pop("control", None)
    if control is not None:
        if kw["geno"]:
            raise click.UsageError("give -g or --control, not both")
        kw["geno"] = control
    if not kw.get("geno"):
        raise click.UsageError("missing -g (or --control, or --example)")
    kw["host"] = kw.get("host") or ""
    kw["queue"] = kw.get("queue") or ""
    kw["gemma_flags"] = list(kw.get("gemma_flags") or [])
    fields = set(GemmaRequest.__dataclass_fields__)
    return GemmaRequest(**{k: v for k, v in kw.items() if k in fields},
                        options={k: v for k, v in kw.items() if k in params.by_name})


def run_cli(cli: CliServices, kw: dict[str, Any], params: Params) -> int:
    """`sheepdog run gemma-*`: validate, submit, wait, export; returns the exit code."""
    detach, as_json, verbose = kw.pop("detach"), kw.pop("as_json"), kw.pop("verbose")
    race, complete_all = kw.pop("race"), kw.pop("complete_all")
    settings = cli.settings()
    request = _request(kw, params)
    cache = Cache(settings.cache_dir)
    if race:
        out_dir = request.out_dir
        return cli.run_race(
            settings, race, complete_all, request.queue or settings.queue,
            lambda: build_job(request, settings, cache),
            after=lambda db, s, winner, label: _race_won(cli, db, s, winner, label, out_dir))
    db = cli.conn(settings)
    job, tasks = build_job(request, settings, cache)
    jobs.submit(db, settings, job, tasks)  # with --force, forgets the pieces first
    if not detach:
        cli.finalize(db, settings, job.id)  # a fully cached job ends right here
    return cli.finish(db, settings, job.id, job.queue, detach, as_json,
                      after_wait=lambda db, s, job_id: _after(cli, db, s, job_id),
                      # a scan's pieces print GEMMA's progress: hidden unless asked for;
                      # permutations print one line each, worth seeing
                      show_output=verbose or request.permutations > 0)


def _race_won(cli: CliServices, db: Any, settings: Settings, winner: Job, label: str,
              out_dir: str) -> None:
    cli.finalize(db, settings, winner.id)  # the compact result, if no worker wrote it yet
    if out_dir:
        store.set_job_fields(db, winner.id, out_dir=str(Path(out_dir).resolve()))
        result.export(db, settings, store.get_job(db, winner.id), Path(out_dir))
    click.echo(f"results of lane {label} in {out_dir or 'the cache'}", err=True)


def _after(cli: CliServices, db: Any, settings: Settings, job_id: str) -> None:
    cli.finalize(db, settings, job_id)
    job = store.get_job(db, job_id)
    if job.status == JobStatus.SUCCESS and job.out_dir:
        click.echo(f"results in {job.out_dir}", err=True)


def _required_with(paths: dict[str, Path]) -> None:
    """pheno unless R/qtl2 names it, anno with BIMBAM genotypes."""
    kind = formats.kind_of(paths["geno"])
    for role, needed in (("pheno", kind != formats.QTL2), ("anno", kind == formats.BIMBAM)):
        if needed and role not in paths:
            raise FieldError(f"inputs.{role}", "is required with "
                             f"{'BIMBAM' if kind == formats.BIMBAM else 'GN .geno'} genotypes")


def confined(paths: dict[str, Path], settings: Settings) -> tuple[str, ...]:
    """Where files named inside a request's inputs may be: beside those inputs (their
    upload, bundle or root) or under an input root."""
    return tuple(dict.fromkeys([*settings.input_roots, *(str(p.parent) for p in
                                                         paths.values())]))


def as_field(e: InputError, paths: dict[str, Path]) -> FieldError:
    """An input's problem named by its field, not by where the server put the file."""
    message = str(e)
    for role, path in paths.items():
        message = message.replace(str(path), f"inputs.{role}")
    for folder in sorted({str(p.parent) for p in paths.values()}, key=len, reverse=True):
        message = message.replace(folder + "/", "")  # a file beside them: by its name
    field = next((f"inputs.{r}" for r, p in paths.items() if str(p) == e.where), "inputs")
    return FieldError(field, message)


class GemmaWorkflow(Workflow):
    """A LOCO scan (or, `loco` False, a scan against the kinship of all SNPs), and with
    `permutations` its permutation thresholds too."""

    reads_inputs = True

    def __init__(self, name: str, summary: str, permutations: bool, loco: bool = True) -> None:
        self.name, self.summary, self.permutations = name, summary, permutations
        self.loco = loco
        self.params = SCAN_PARAMS.plus(*PERMUTATION_PARAMS) if permutations else SCAN_PARAMS
        self.result_files = dict(SCAN_FILES)
        if permutations:
            self.result_files["permutations.json"] = "application/json"

    def command(self, cli: CliServices) -> click.Command:
        def run(**kw: Any) -> None:
            try:  # every declared bound, before any file is read
                self.params.check(kw)
            except ConfigError as e:
                raise click.UsageError(str(e)) from e
            kw["loco"] = self.loco
            if not self.permutations:
                kw["permutations"] = 0
            sys.exit(run_cli(cli, kw, self.params))

        run.__doc__ = self.summary
        command = cli.backend_options(gemma_inputs(self.params.options(run)))
        return click.command(self.name, help=self.summary)(command)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow"], "properties": {
            "workflow": {"const": self.name},
            "inputs": {"type": "object", "description": "file names of uploads or bundle "
                       "members, or server paths under SHEEPDOG_INPUT_ROOTS",
                       "properties": {r: {"type": "string"} for r in ROLES}},
            "params": self.params.schema()}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        raw_inputs = body.get("inputs", {})
        if not isinstance(raw_inputs, dict):
            raise FieldError("inputs", "must be an object mapping geno/pheno/anno/covariates "
                             "to files")
        params = self.params.parse(body.get("params"))  # before any file is touched
        paths = inputs(raw_inputs, ROLES, REQUIRED)
        try:
            _required_with(paths)  # (reads the genotypes' first line to tell their format)
        except InputError as e:
            raise as_field(e, paths) from e
        fields = set(GemmaRequest.__dataclass_fields__)
        request = GemmaRequest(geno=paths["geno"], pheno=paths.get("pheno"),
                               anno=paths.get("anno"),
                               covariates=paths.get("covariates"),
                               backend=body.get("backend") or "local",
                               host=body.get("host") or "", queue=body.get("queue") or "",
                               loco=self.loco, options=params,
                               confine=confined(paths, settings),
                               **{k: v for k, v in params.items() if k in fields})
        try:
            return build_job(request, settings, cache)
        except InputError as e:
            raise as_field(e, paths) from e
        except ConfigError as e:
            raise FieldError("params", str(e)) from e

    def finalize(self, conn: redis.Redis, settings: Settings, job: Job) -> None:
        result.finalize(conn, settings, job)

    def describe(self, conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
        return result.describe(conn, settings, job)

    def export(self, conn: redis.Redis, settings: Settings, job: Job,
               out_dir: Path) -> dict[str, Any]:
        return result.export(conn, settings, job, out_dir)

    def result_file(self, settings: Settings, job: Job, name: str) -> Path:
        if name not in self.result_files:
            raise FieldError("name", f"no result file {name!r}; available: "
                             f"{', '.join(self.result_files)}", 404)
        task = job.params["permutation_task" if name == "permutations.json" else "scan_task"]
        path = Cache(settings.cache_dir).task_dir(task) / name
        if not path.is_file():
            raise FieldError("name", f"{name} is no longer in the cache", 410)
        return path
