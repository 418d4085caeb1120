"""The workflow contract: how a workflow is asked for, becomes tasks, and is gathered.

The core (store, worker, runner, finalize, cli, web) calls these and names no
workflow; a workflow may use every core module.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import redis

from ..cache import Cache
from ..config import Settings
from ..errors import FieldError
from ..models import Job, Task

# Turns a request's `inputs` into local paths: (inputs object, roles it may name,
# roles it must name) -> role -> path. The web service provides it (uploads, bundles,
# server-side roots), raising FieldError naming the input.
InputResolver = Callable[[Any, tuple[str, ...], tuple[str, ...]], dict[str, Path]]


class Workflow(abc.ABC):
    """One kind of job a user can ask for."""

    name: str = ""
    summary: str = ""
    # files a finished job serves at GET /jobs/<id>/result/<name>: name -> media type
    result_files: dict[str, str] = {}
    # from_request reads and splits input files: the web service then runs it in a
    # child process with memory and CPU limits (web/prepare.py)
    reads_inputs: bool = False
    # also a top-level command: `sheepdog NAME ...` is `sheepdog run NAME ...`
    top_level: bool = False
    # a job that ended in error still has results (the items that succeeded)
    partial_results: bool = False
    # its jobs run any program the request names: over HTTP only admin tokens may ask
    runs_commands: bool = False

    @abc.abstractmethod
    def command(self) -> click.Command:
        """`sheepdog run NAME ...`: its options, validation and waiting."""

    def commands(self) -> list[click.Command]:
        """More top-level commands of its own (`sheepdog precompute ...`); default none."""
        return []

    def blueprint(self) -> Any:
        """A Flask blueprint of its own routes for `sheepdog serve`, or None."""
        return None

    @abc.abstractmethod
    def schema(self) -> dict[str, Any]:
        """The JSON schema of its POST /jobs body (merged into the OpenAPI document)."""

    @abc.abstractmethod
    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache) -> tuple[Job, list[Task]]:
        """Validate a POST /jobs body and expand it into a job and its tasks;
        FieldError names the field that is wrong."""

    def finalize(self, conn: redis.Redis, settings: Settings, job: Job) -> None:  # noqa: B027
        """Once, when the job succeeded: gather and export its result (default: none)."""

    def describe(self, conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
        """The finished job's result as JSON (GET /jobs/<id>/result, `sheepdog result`)."""
        return {"id": job.id, "status": job.status, "exit_code": job.exit_code}

    def export(self, conn: redis.Redis, settings: Settings, job: Job,
               out_dir: Path) -> dict[str, Any]:
        """Write the result's files into out_dir; returns what describe() says."""
        raise FieldError("out", f"{self.name} jobs have no result files to write")

    def result_file(self, settings: Settings, job: Job, name: str) -> Path:
        """The path of one result file; FieldError (404/410) when there is none."""
        raise FieldError("name", f"no result file {name!r} for {self.name} jobs", 404)

    def piece_done(self, conn: redis.Redis, settings: Settings, job: Job,  # noqa: B027
                   task: Task) -> None:
        """After each of the job's pieces succeeded, by the worker that ran it (default:
        nothing). May stop the job early (store.stop_job)."""

    def on_timer(self, conn: redis.Redis, settings: Settings, job: Job) -> None:  # noqa: B027
        """Called once when a timer the workflow set (store.set_timer) is due, by a
        worker's upkeep (default: nothing)."""

    def items(self, conn: redis.Redis, settings: Settings, job: Job, state: str | None,
              after: str | None, limit: int) -> dict[str, Any]:
        """One page of the job's items, in input order (GET /jobs/<id>/items)."""
        raise FieldError("items", f"{self.name} jobs have no items", 404)

    def item(self, conn: redis.Redis, settings: Settings, job: Job, key: str) -> dict[str, Any]:
        """One item's record by key; FieldError 404 (no such item) or 409 (not finished,
        failed) otherwise, never an empty answer."""
        raise FieldError("item", f"{self.name} jobs have no items", 404)
