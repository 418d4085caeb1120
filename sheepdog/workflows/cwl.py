"""`cwl`: a Common Workflow Language tool or workflow (`sheepdog run cwl PROCESS
[JOB]`), each tool invocation a piece of the job (see sheepdog.cwlrun)."""

from __future__ import annotations

import io
import json
import mimetypes
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from .. import jobs
from ..cache import Cache
from ..config import Settings
from ..errors import ConfigError, FieldError
from ..models import Job, Task
from .base import CliServices, InputResolver, Workflow

if TYPE_CHECKING:
    import redis


def cwl_command(cli: CliServices) -> click.Command:
    @click.command("cwl")
    @click.option("--outdir", default=".", show_default=True, type=click.Path(file_okay=False),
                  help="Where the output files go.")
    @click.option("--backend", default="local", show_default=True,
                  help="Where the tool invocations run: local (in place, on this disk), "
                       "shell or slurm (staged by content; their outputs come back).")
    @click.option("--host", default=None, help="Host (ssh config name) for shell/slurm.")
    @click.option("--queue", default=None, help="Queue name (default: from settings).")
    @click.option("--stage", is_flag=True,
                  help="Stage every invocation by content on the local backend too (its "
                       "pieces are then cached across runs and hosts; automatic when a pull "
                       "worker serves the queue).")
    @click.option("--quiet", is_flag=True, help="Only the output object and errors.")
    @click.option("--cache/--no-cache", default=True, show_default=True,
                  help="Reuse a tool invocation's outputs when its command line, inputs and "
                       "requirements are unchanged (cwltool's --cachedir, in SHEEPDOG_HOME).")
    @click.argument("process", type=click.Path(exists=True, dir_okay=False))
    @click.argument("job_order", required=False, type=click.Path(exists=True, dir_okay=False))
    def run_cwl(process: str, job_order: str | None, outdir: str, backend: str,
                host: str | None, queue: str | None, stage: bool, quiet: bool,
                cache: bool) -> None:
        """Run a CWL CommandLineTool or Workflow; the output object on stdout, exit 0
        (success), 1 (failure) or 33 (an unsupported requirement). A run stopped half-way
        and started again runs only what did not finish (with --cache)."""
        from .. import cwlrun

        settings = cli.settings()
        cached = ["--cachedir", str(settings.home / "cwl-cache")] if cache else []
        argv = ["--outdir", outdir, *cached, *(["--quiet"] if quiet else []), process,
                *([job_order] if job_order else [])]
        sys.exit(cwlrun.run(argv, settings, queue=queue, backend=backend, host=host or "",
                            stage=stage))

    return run_cwl


ROLES = ("process", "job")  # inputs of a POST /jobs: the CWL document, its input object


class AnyName(Mapping[str, str]):
    """A CWL run's result files are whatever its outputs are named: every plain name
    may be asked for (GET /jobs/<id>/result/<name>); none is listed in advance."""

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(name) and "/" not in name and name not in (
            ".", "..")

    def __getitem__(self, name: str) -> str:
        return mimetypes.guess_type(name)[0] or "application/octet-stream"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _kept(paths: dict[str, Path], order: Any, settings: Settings, home: Path
          ) -> tuple[Path, Path | None]:
    """The process and its input object where the run will find them: uploads (and a
    bundle's members, with the files they name beside them) copied out of the request's
    upload directory, which goes when the request ends; paths under the input roots as
    they are; an inline `job_order` as a JSON file."""
    uploads = (settings.home / "uploads").resolve()
    kept: dict[str, Path] = {}
    for role, path in paths.items():
        resolved = path.resolve()
        if resolved.is_relative_to(uploads):
            request_dir = uploads / resolved.relative_to(uploads).parts[0]
            copy = home / "in"
            if not copy.exists():
                shutil.copytree(request_dir, copy, symlinks=False)
            resolved = copy / resolved.relative_to(request_dir)
        kept[role] = resolved
    if order is not None:
        home.mkdir(parents=True, exist_ok=True)
        kept["job"] = home / "job.json"
        kept["job"].write_text(json.dumps(_beside(order, kept["process"].parent)))
    return kept["process"], kept.get("job")


def _beside(value: Any, base: Path) -> Any:
    """An inline input object's relative file paths made absolute under `base` (the
    process's directory: cwltool would take them relative to the job file's)."""
    if isinstance(value, list):
        return [_beside(v, base) for v in value]
    if not isinstance(value, dict):
        return value
    found = {k: _beside(v, base) for k, v in value.items()}
    if value.get("class") in ("File", "Directory"):
        for key in ("path", "location"):
            given = found.get(key)
            if isinstance(given, str) and given and ":" not in given.split("/")[0] \
                    and not given.startswith("/"):
                found[key] = str(base / given)
    return found


def _validate(process: Path, job_order: Path | None) -> None:
    """cwltool's own check of the document, and that the input object is one: a 400
    that says what is wrong, not a job that fails later."""
    try:
        import cwltool.main
    except ImportError as e:
        raise FieldError("workflow", "CWL runs need cwltool on the service: pip install "
                         "'sheepdog[cwl]'", 501) from e
    said = io.StringIO()
    code = cwltool.main.main(["--validate", str(process)], stdout=said, stderr=said)
    if code != 0:
        raise FieldError("inputs.process", _last_words(said.getvalue(), process))
    if job_order is not None:
        try:
            loaded = yaml.safe_load(job_order.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise FieldError("inputs.job", f"not a YAML or JSON input object: {e}") from e
        if not isinstance(loaded, dict):
            raise FieldError("inputs.job", "must be an object (CWL's input object)")


def _last_words(said: str, process: Path) -> str:
    lines = [ln for ln in said.splitlines() if ln.strip() and "INFO" not in ln][-6:]
    return " ".join(lines).replace(str(process.parent) + "/", "")[-1500:] or "not valid CWL"


def _public(value: Any, job: Job, out: Path) -> Any:
    """The output object as a client may see it: files in the result directory by their
    result URL, no server paths."""
    if isinstance(value, list):
        return [_public(v, job, out) for v in value]
    if not isinstance(value, dict):
        return value
    found = {k: _public(v, job, out) for k, v in value.items()
             if k not in ("path", "location", "dirname")}
    if value.get("class") in ("File", "Directory"):
        path = Path(str(value.get("path") or ""))
        if path.parent == out:
            found["location"] = f"/jobs/{job.id}/result/{path.name}"
    return found


class Cwl(Workflow):
    name = "cwl"
    runs_commands = True  # a CWL tool runs whatever program it names: the admin role
    reads_inputs = True  # validated by cwltool in a bounded child process
    summary = "a CWL tool or workflow, each tool invocation a piece"
    result_files = AnyName()

    def command(self, cli: CliServices) -> click.Command:
        return cwl_command(cli)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow", "inputs"], "properties": {
            "workflow": {"const": self.name},
            "inputs": {"type": "object", "required": ["process"], "description": (
                "process: the CWL document (.cwl), job: its input object (.yml/.json); "
                "file names of uploads or bundle members, or server paths under "
                "SHEEPDOG_INPUT_ROOTS"),
                "properties": {r: {"type": "string"} for r in ROLES}},
            "job_order": {"type": "object", "description": "the input object inline "
                          "(instead of inputs.job); its file paths relative to the process"}}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        order = body.get("job_order")
        if order is not None and not isinstance(order, dict):
            raise FieldError("job_order", "must be an object (CWL's input object)")
        paths = inputs(body.get("inputs", {}), ROLES, ("process",))
        if order is not None and "job" in paths:
            raise FieldError("job_order", "give the input object once: inputs.job or "
                             "job_order")
        backend, host = str(body.get("backend") or "local"), str(body.get("host") or "")
        try:
            jobs.check_backend(backend, host)
        except ConfigError as e:
            raise FieldError("backend", str(e)) from e
        job_id = jobs.new_job_id()
        home = settings.jobs_dir / job_id  # goes with the job (retention)
        process, job_order = _kept(paths, order, settings, home)
        try:
            _validate(process, job_order)
        except FieldError:
            shutil.rmtree(home, ignore_errors=True)  # nothing kept of a refused request
            raise
        queue = str(body.get("queue") or settings.queue)
        out = home / "out"
        out.mkdir(parents=True, exist_ok=True)
        runner = Task(
            name="cwl-runner", argv=[
                {"python": True}, "-m", "sheepdog.cwlrun", "--outdir", str(out),
                "--cachedir", str(settings.home / "cwl-cache"), str(process),
                *([str(job_order)] if job_order else [])],
            cacheable=False, nonce=job_id, cwd=str(process.parent), queue=queue,
            env={"SHEEPDOG_CWL_JOB": job_id, "SHEEPDOG_CWL_BACKEND": backend,
                 "SHEEPDOG_CWL_HOST": host, "SHEEPDOG_CWL_OUTPUT": str(home / "output.json")},
            max_attempts=settings.max_attempts)
        job = Job(id=job_id, workflow=self.name, queue=queue, backend=backend, host=host,
                  command=[str(process), *([str(job_order)] if job_order else [])],
                  params={"process": process.name, "open": True}, out_dir=str(out))
        return job, [runner]

    def describe(self, conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
        said: dict[str, Any] = {"id": job.id, "status": job.status, "exit_code": job.exit_code}
        kept = settings.jobs_dir / job.id / "output.json"
        if kept.is_file():
            said["output"] = _public(json.loads(kept.read_text()), job, Path(job.out_dir))
        return said

    def result_file(self, settings: Settings, job: Job, name: str) -> Path:
        path = Path(job.out_dir) / name
        if name not in self.result_files or not job.out_dir or not path.is_file():
            raise FieldError("name", f"no output file {name!r} in this run's results", 404)
        return path


WORKFLOW = Cwl()
