"""The workflow contract: how a workflow is asked for, becomes tasks, and is gathered.

The core (store, worker, runner, finalize, cli, web) calls these and names no
workflow. A workflow uses the core's lower layers (store, jobs, cache, ...), never the
presentation: its command line gets the CLI's services (`CliServices`, the clirun
module) and its routes the web service's (`WebServices`) passed in, so no import
arrow points from a workflow up to the CLI or the web service.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..cache import Cache
from ..config import Settings
from ..errors import FieldError
from ..models import Job, Task
from ..store import Count

if TYPE_CHECKING:  # only named: `sheepdog result` reads a job without loading them
    import click
    import redis

# Turns a request's `inputs` into local paths: (inputs object, roles it may name,
# roles it must name) -> role -> path. The web service provides it (uploads, bundles,
# server-side roots), raising FieldError naming the input.
InputResolver = Callable[[Any, tuple[str, ...], tuple[str, ...]], dict[str, Path]]
F = TypeVar("F", bound=Callable[..., Any])


class CliServices(Protocol):
    """What a workflow's command line may ask of the CLI (sheepdog.clirun gives it)."""

    def settings(self) -> Settings: ...

    def conn(self, given: Settings | None = None) -> Any: ...

    def backend_options(self, fn: F) -> F:
        """A decorator: --backend, --host, --queue, --detach, --json, --race."""

    def finish(self, db: Any, given: Settings, job_id: str, queue: str, detach: bool,
               as_json: bool, after_wait: Callable[[Any, Settings, str], None] | None = None,
               concurrency: int | None = None, show_notes: bool = True,
               show_output: bool = True) -> int:
        """Detach, or follow the job to its end; returns the exit code."""

    def run_race(self, given: Settings, spec: str, complete_all: bool, queue: str,
                 build: Callable[[], tuple[Job, list[Task]]],
                 after: Callable[[Any, Settings, Any, str], None] | None = None) -> int: ...

    def print_json(self, value: Any) -> None: ...

    def finalize(self, conn: Any, settings: Settings, job_id: str) -> None:
        """The job's result, once it ended."""


class WebServices(Protocol):
    """What a workflow's routes may ask of the web service (web/__init__.py gives it)."""

    def conn(self) -> Any:
        """The service's Redis client."""

    def token_to_cookie(self) -> Any:
        """A page opened with ?token=: the redirect that moves it into a cookie, or None."""


class Workflow(abc.ABC):
    """One kind of job a user can ask for."""

    name: str = ""
    summary: str = ""
    # files a finished job serves at GET /jobs/<id>/result/<name>: name -> media type
    result_files: Mapping[str, str] = {}
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
    def command(self, cli: CliServices) -> click.Command:
        """`sheepdog run NAME ...`: its options, validation and waiting."""

    def commands(self, cli: CliServices) -> list[click.Command]:
        """More top-level commands of its own (`sheepdog precompute ...`); default none."""
        return []

    def blueprint(self, web: WebServices) -> Any:
        """A Flask blueprint of its own routes for `sheepdog serve`, or None."""
        return None

    @abc.abstractmethod
    def schema(self) -> dict[str, Any]:
        """The JSON schema of its POST /jobs body (merged into the OpenAPI document)."""

    @abc.abstractmethod
    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        """Validate a POST /jobs body and expand it into a job and its tasks;
        FieldError names the field that is wrong. `owner`: the name of the token that
        sent it (what it makes may belong to it)."""

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

    def piece_counts(self, settings: Settings, job: Job, task: Task) -> Count | None:
        """What a piece that succeeded adds to the job's counters, read from its outputs
        before its success is recorded, so that both go in one call (default: nothing;
        see store.Count). `job` is as submitted (see store.submitted_job)."""
        return None

    def piece_done(self, conn: redis.Redis, settings: Settings, job: Job,  # noqa: B027
                   task: Task, totals: dict[str, int] | None = None) -> None:
        """After each of the job's pieces succeeded, by the worker that ran it (default:
        nothing). May stop the job early (store.stop_job). `job` is as submitted (see
        store.submitted_job): its status and counters may be old. `totals`: the job's
        counters once the piece's Count was added with its success; None when it was
        not (recorded another way): then the workflow counts the piece itself."""

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
