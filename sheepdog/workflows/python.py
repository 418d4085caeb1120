"""`python`: Python calls run as pieces; the jobs of `sheepdog.Executor`, and
`sheepdog run python MODULE:FUNCTION [ARG...]` for one call from the command line."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..cache import Cache
from ..config import Settings
from ..errors import FieldError
from ..models import Job, Task
from .base import CliServices, InputResolver, Workflow


@click.command("python")
@click.option("--queue", default=None, help="Queue name (default: from settings).")
@click.option("--setup", default=None, metavar="MODULE:FUNCTION",
              help="Run once per worker; its value reaches the call as context=.")
@click.argument("function")
@click.argument("args", nargs=-1)
def run_python(function: str, args: tuple[str, ...], queue: str | None,
               setup: str | None) -> None:
    """Call MODULE:FUNCTION(ARG, ...) on a worker; print its value as JSON (or repr)."""
    from ..calls import resolve
    from ..executor import Executor

    try:
        fn = resolve(function)
    except (ImportError, AttributeError, ValueError, TypeError) as e:
        raise click.UsageError(f"cannot find {function}: {e}") from e
    with Executor(queue=queue, setup=setup, max_workers=1) as ex:
        value = ex.submit(fn, *args).result()
    try:
        click.echo(json.dumps(value))
    except TypeError:
        click.echo(repr(value))
    sys.exit(0)


class Python(Workflow):
    name = "python"
    summary = "Python calls (sheepdog.Executor); one call from the command line"

    def command(self, cli: CliServices) -> click.Command:
        return run_python

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow"], "properties": {
            "workflow": {"const": self.name, "description": "not accepted over HTTP: "
                         "Python calls are pickled, and come from sheepdog.Executor"}}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        raise FieldError("workflow", "python jobs come from sheepdog.Executor (pickled calls "
                         "run code as the workers); they are not accepted over HTTP")


WORKFLOW = Python()
