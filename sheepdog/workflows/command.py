"""`command`: one program run once, as given (`sheepdog run -- CMD ARGS`)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from .. import jobs
from ..cache import Cache
from ..config import Settings
from ..errors import ConfigError, FieldError
from ..models import Job, Task
from .base import CliServices, InputResolver, Workflow

if TYPE_CHECKING:
    import click


def command_line(cli: CliServices) -> click.Command:
    import click  # here: `sheepdog result` of a command's job reads it without click

    @click.command("command", context_settings={"ignore_unknown_options": True,
                                                 "allow_interspersed_args": False})
    @cli.backend_options
    @click.option("--timeout", type=float, default=0.0, help="Kill the command after SECONDS.")
    @click.argument("argv", nargs=-1, type=click.UNPROCESSED)
    def run_command(argv: tuple[str, ...], backend: str, host: str | None, queue: str | None,
                    detach: bool, as_json: bool, timeout: float, race: str | None,
                    complete_all: bool) -> None:
        """Run one command as a job; exit with its exit code."""
        settings = cli.settings()
        job, tasks = jobs.command_job(list(argv), settings, backend=backend, host=host,
                                      queue=queue, timeout=timeout)
        if race:
            sys.exit(cli.run_race(settings, race, complete_all, queue or settings.queue,
                                  lambda: jobs.command_job(list(argv), settings, queue=queue,
                                                           timeout=timeout)))
        db = cli.conn(settings)
        jobs.submit(db, settings, job, tasks)
        sys.exit(cli.finish(db, settings, job.id, job.queue, detach, as_json))

    return run_command


class Command(Workflow):
    name = "command"
    runs_commands = True
    summary = "one program run once, as given"

    def command(self, cli: CliServices) -> click.Command:
        return command_line(cli)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow", "command"], "properties": {
            "workflow": {"const": self.name},
            "command": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                        "description": "the program and its arguments"}}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        command = body.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            raise FieldError("command", "must be a list of strings (the program and its "
                             "arguments)")
        try:
            return jobs.command_job(command, settings, backend=body.get("backend") or "local",
                                    host=body.get("host"), queue=body.get("queue"),
                                    cwd=str(settings.home))
        except ConfigError as e:
            raise FieldError("command" if "command" in str(e) else "backend", str(e)) from e


WORKFLOW = Command()
