"""`cwl`: a Common Workflow Language tool or workflow (`sheepdog run cwl PROCESS
[JOB]`), each tool invocation a piece of the job (see sheepdog.cwlrun)."""

from __future__ import annotations

import sys
from typing import Any

import click

from ..cache import Cache
from ..config import Settings
from ..errors import FieldError
from ..models import Job, Task
from .base import CliServices, InputResolver, Workflow


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


class Cwl(Workflow):
    name = "cwl"
    runs_commands = True  # a CWL tool runs whatever program it names
    summary = "a CWL tool or workflow, each tool invocation a piece"

    def command(self, cli: CliServices) -> click.Command:
        return cwl_command(cli)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow"], "properties": {
            "workflow": {"const": self.name}}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        raise FieldError("workflow", "CWL runs are started by `sheepdog run cwl` or "
                         "sheepdog-cwl-runner; POST /jobs does not take them yet")


WORKFLOW = Cwl()
