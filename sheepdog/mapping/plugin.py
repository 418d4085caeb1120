"""`map` as sheepdog sees it: `sheepdog map ...` (also `sheepdog run map`), its POST
/jobs body, its per-piece counting (--max-failures) and its items by key."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import click
import redis

from .. import jobs, logs, store
from ..cache import Cache, task_file
from ..config import Settings
from ..errors import ConfigError, FieldError, InputError
from ..models import Job, JobStatus, Task, TaskStatus
from ..params import Param, Params
from ..workflows.base import CliServices, InputResolver, Workflow
from . import build, items, results, step
from .build import MapRequest

PAGE = 100  # items per GET /jobs/<id>/items page, at most
# map's request fields, each declared once: its CLI options, its POST /jobs fields (top
# level, beside `command` and `items`) and their parsing come from here
MAP_PARAMS = Params(
    Param("chunk", int, None, "Items per piece; each is still recorded on its own. Default: "
          "one per piece up to 200 items, beyond that 200 pieces (at most 1,000 items each); "
          "one per piece with --cache. --chunk 1 for long items.", minimum=1),
    Param("cache", bool, False, "Reuse items already computed (content addressed)."),
    Param("sample", int, None, "Run a reproducible sample of N items.", minimum=1),
    Param("seed", int, 0, "Seed for --sample."),
    Param("check", list, [], "Items whose output is JSON must agree on FIELD (repeatable)."),
    Param("timeout", float, 0.0, "Kill an item after SECONDS (0: never).", minimum=0),
    Param("straggler_after", float, 0.0, "Once the others are done, start a piece still "
          "running after S seconds once more elsewhere; the first to finish wins.",
          minimum=0),
    Param("append", bool, True, "false: a command without placeholders runs as it is, not "
          "with the item last (the CLI's -N0; the item's key is in $SHEEPDOG_ITEM_KEY).",
          cli=False),
)


def _read_items(items_file: Path | None, key: str | None, range_spec: str | None,
                files: str | None) -> tuple[list[items.Item], list[str] | None, str]:
    given = [x for x in (items_file, range_spec, files) if x is not None]
    if len(given) != 1:
        raise click.UsageError("give exactly one of --items FILE, --range A:B, --files GLOB "
                               "(or --retry-failed JOB)")
    if items_file is not None:
        found = items.read_items(items_file, key)
        columns = list(found[0].columns) if found and found[0].columns else None
        return found, columns, str(items_file)
    if key is not None:
        raise click.UsageError("--key needs --items FILE (a CSV/TSV with a header)")
    if range_spec is not None:
        return items.read_range(range_spec), None, f"--range {range_spec}"
    assert files is not None
    return items.read_files(files), None, f"--files {files}"


def _retry(db: Any, settings: Settings, old_id: str, request_kw: dict[str, Any]
           ) -> tuple[Job, list[Task]]:
    old = store.get_job(db, old_id)
    if old.workflow != "map":
        raise click.UsageError(f"job {old_id} is a {old.workflow} job, not a map job")
    if not old.status.final:
        raise click.UsageError(f"job {old_id} is still {old.status}; retry it once it ended")
    return build.retry_job(db, settings, Cache(settings.cache_dir), old, **request_kw)


def _summary_line(db: Any, settings: Settings, job_id: str) -> None:
    job = store.get_job(db, job_id)
    try:
        found = results.summary(db, settings, job)
    except (FieldError, OSError, ValueError) as e:
        click.echo(f"sheepdog: cannot summarize the items: {e}", err=True)
        return
    counts = ", ".join(f"{n:,d} {s}" for s, n in sorted(found["counts"].items()))
    click.echo(f"[sheepdog] {found['items']:,d} items: {counts}", err=True)


def command_line(cli: CliServices) -> click.Command:
    @click.command("map", context_settings={"ignore_unknown_options": True,
                                             "allow_interspersed_args": False})
    @click.option("--items", "items_file", type=click.Path(path_type=Path), default=None,
                  help="One item per line, or a CSV/TSV with a header (see --key).")
    @click.option("--key", default=None, help="The CSV/TSV column that names each item.")
    @click.option("--range", "range_spec", default=None, metavar="A:B",
                  help="The whole numbers A to B (both included).")
    @click.option("--files", default=None, metavar="GLOB",
                  help="Files matching GLOB; each is staged by content wherever it runs.")
    @click.option("--max-args", "-N", "max_args", type=click.IntRange(0, 1), default=1,
                  help="-N0: run the command as it is for each item, without adding the item "
                       "when it has no placeholder (GNU parallel's -N0); the item's key is in "
                       "$SHEEPDOG_ITEM_KEY.")
    @click.option("--jobs", "-j", "concurrency", type=click.IntRange(1), default=None,
                  help="Items at once on this machine, when no worker serves the queue.")
    @click.option("--max-failures", default="", metavar="N|P%",
                  help="Stop early once more than N items (or P% of them) failed.")
    @click.option("--retry-failed", "retry_of", default=None, metavar="JOB",
                  help="Run again only the items of JOB that did not succeed.")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None,
                  help="Write DIR/items.jsonl (input order) and each item's files.")
    @click.option("--backend", default="local", show_default=True, help="Where the items run.")
    @click.option("--host", default=None, help="Host (ssh config name) for shell/slurm.")
    @click.option("--queue", default=None, help="Queue name (default: from settings).")
    @click.option("--detach", is_flag=True, help="Print the job id and return at once.")
    @click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON.")
    @MAP_PARAMS.options
    @click.argument("template", nargs=-1, type=click.UNPROCESSED)
    def map_command(**kw: Any) -> None:
        """Run a command once per item, like GNU parallel, durably and anywhere.

        Placeholders: {} the item, {#} its number, {/} {//} {.} {/.} its path's parts,
        {COL} a CSV column, {file:COL} a column's file staged by content.
        """
        sys.exit(run_map(cli, kw))

    return map_command


def run_map(cli: CliServices, kw: dict[str, Any]) -> int:
    MAP_PARAMS.check(kw)
    settings = cli.settings()
    db = cli.conn(settings)
    template = [a for a in kw["template"] if a != "--"] if kw["template"][:1] == ("--",) \
        else list(kw["template"])
    common = {"backend": kw["backend"], "host": kw["host"] or "", "queue": kw["queue"] or ""}
    if kw["retry_of"]:
        job, tasks = _retry(db, settings, kw["retry_of"], common)
    else:
        found, columns, source = _read_items(kw["items_file"], kw["key"], kw["range_spec"],
                                             kw["files"])
        if kw["sample"] is not None:
            found = items.sample(found, kw["sample"], kw["seed"])
        request = MapRequest(template=template, items=found, files=kw["files"] is not None,
                             columns=columns, chunk=kw["chunk"], cache=kw["cache"],
                             timeout=kw["timeout"], checks=list(kw["check"]),
                             straggler_after=kw["straggler_after"],
                             max_failures=kw["max_failures"], cwd=build.spec_cwd(None),
                             append=kw["max_args"] == 1, source=source, **common)
        job, tasks = build.build_job(request, settings, Cache(settings.cache_dir))
    jobs.submit(db, settings, job, tasks)
    code = cli.finish(db, settings, job.id, job.queue, kw["detach"], kw["as_json"],
                      concurrency=kw["concurrency"], show_notes=False)
    if kw["detach"]:
        return code
    if kw["out_dir"] is not None:
        written = results.export(db, settings, store.get_job(db, job.id), kw["out_dir"])
        click.echo(f"[sheepdog] items written to {written['out']}", err=True)
    if not kw["as_json"]:
        _summary_line(db, settings, job.id)
    return code


# ---------------------------------------------------------------- POST /jobs


def _inline_items(raw: Any, key: str | None) -> tuple[list[items.Item], list[str] | None]:
    if not isinstance(raw, list) or not raw:
        raise FieldError("items", "must be a non-empty list of strings or of objects")
    if all(isinstance(x, str) for x in raw):
        if key is not None:
            raise FieldError("key", "needs items given as objects")
        found = [items.Item(i, x, x, {}, f"items[{i - 1}]") for i, x in enumerate(raw, 1)]
        return items.unique(found, "items"), None
    if not all(isinstance(x, dict) for x in raw):
        raise FieldError("items", "must all be strings, or all objects")
    return _object_items(raw, key)


def _object_items(raw: list[dict[str, Any]], key: str | None
                  ) -> tuple[list[items.Item], list[str] | None]:
    """Items given as objects: their fields are the columns, alike in every item."""
    columns = list(raw[0])
    made = []
    for i, row in enumerate(raw, 1):
        if list(row) != columns or not all(isinstance(v, str | int | float) for v in row.values()):
            raise FieldError(f"items[{i - 1}]", f"must have the fields {columns} with "
                             "string or number values, like items[0]")
        cells = {k: str(v) for k, v in row.items()}
        if key is not None and key not in cells:
            raise FieldError("key", f"{key!r} is not a field of the items; they have {columns}")
        made.append(items.Item(i, cells[key] if key else str(i), json.dumps(row), cells,
                               f"items[{i - 1}]"))
    return items.unique(made, "items"), columns


def _under_roots(paths: list[str], roots: tuple[str, ...]) -> None:
    for path in paths:
        resolved = Path(path).resolve()
        if not any(resolved.is_relative_to(Path(r).resolve()) for r in roots):
            raise FieldError("items", f"{path[:200]!r} is not under SHEEPDOG_INPUT_ROOTS")


def _uploaded_items(body: dict[str, Any], inputs: InputResolver,
                    key: str | None) -> tuple[list[items.Item], list[str] | None]:
    """Items from a file: an upload (multipart field `items`), a bundle member or a path
    under SHEEPDOG_INPUT_ROOTS, named by `inputs.items`; read as on the command line."""
    raw = body.get("inputs")
    if not isinstance(raw, dict):
        raise FieldError("inputs", "must be an object: {\"items\": FILE}")
    path = inputs(raw, ("items",), ("items",))["items"]
    try:
        found = items.read_items(path, key)
    except InputError as e:
        raise FieldError("inputs.items", e.problem if e.line is None
                         else f"line {e.line}: {e.problem}") from e
    return found, (list(found[0].columns) if found[0].columns else None)


def _body_items(body: dict[str, Any], inputs: InputResolver | None
                ) -> tuple[list[items.Item], list[str] | None]:
    """The items given inline, or as a file (`inputs.items`), keyed by `key`."""
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise FieldError("key", "must be a string (a field of the items)")
    if body.get("items") is None and inputs is not None and "inputs" in body:
        return _uploaded_items(body, inputs, key)
    return _inline_items(body.get("items"), key)


def request_from_body(body: dict[str, Any], settings: Settings,
                      inputs: InputResolver | None = None) -> MapRequest:
    command = body.get("command")
    if not isinstance(command, list) or not command or not all(isinstance(c, str)
                                                               for c in command):
        raise FieldError("command", "must be a non-empty list of strings (with placeholders)")
    found, columns = _body_items(body, inputs)
    given = MAP_PARAMS.fields(body)
    if given["sample"] is not None:
        found = items.sample(found, given["sample"], given["seed"])
    max_failures = body.get("max_failures", "")
    if not isinstance(max_failures, str | int) or isinstance(max_failures, bool):
        raise FieldError("max_failures", "must be a count or a share like \"5%\"")
    return MapRequest(template=list(command), items=found, columns=columns,
                      chunk=given["chunk"], cache=given["cache"], timeout=given["timeout"],
                      checks=given["check"], straggler_after=given["straggler_after"],
                      max_failures=str(max_failures) if max_failures != "" else "",
                      append=given["append"],
                      cwd=str(settings.home), source="POST /jobs",
                      backend=body.get("backend") or "local", host=body.get("host") or "",
                      queue=body.get("queue") or "")


def _items_count(settings: Settings, job: Job, task: Task) -> store.Count:
    """A chunk's items, done and failed, from its results."""
    path = task_file(settings.cache_dir, task.id, step.RESULTS)
    with open(path, "rb") as f:  # bytes: read for every piece, no text layer needed
        statuses = [json.loads(line)["status"] for line in f.read().splitlines()]
    failed = sum(s != "success" for s in statuses)
    # a twin's items are its original's: counted once, whichever finished first
    return store.Count(task.twin_of or task.id,
                       {"items_done": len(statuses), "items_failed": failed},
                       ("items_total", int(job.params["items"])))


class MapWorkflow(Workflow):
    name = "map"
    runs_commands = True
    summary = "one command per item (GNU parallel's placeholders), results by key"
    top_level = True
    partial_results = True
    reads_inputs = True  # an items file, and {file:COL} files hashed into the cache

    def command(self, cli: CliServices) -> click.Command:
        return command_line(cli)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "required": ["workflow", "command"], "properties": {
            "workflow": {"const": self.name},
            "command": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                        "description": "the command, with placeholders {} {#} {COL} ..."},
            "items": {"type": "array", "minItems": 1, "description": "strings (each its own "
                      "key) or objects (columns; see key)",
                      "items": {"type": ["string", "object"]}},
            "inputs": {"type": "object", "description": "instead of items: a file of items "
                       "(one per line, or CSV/TSV with a header), uploaded as `items` or a "
                       "path under SHEEPDOG_INPUT_ROOTS",
                       "properties": {"items": {"type": "string"}}},
            "key": {"type": "string", "description": "the field (or CSV column) that names "
                    "each item (default: its number; a line file's lines are their keys)"},
            "max_failures": {"type": ["string", "integer"]},
            **MAP_PARAMS.schema()["properties"]}}

    def from_request(self, body: dict[str, Any], inputs: InputResolver, settings: Settings,
                     cache: Cache, owner: str = "") -> tuple[Job, list[Task]]:
        try:
            request = request_from_body(body, settings, inputs)
            staged = [p for it in request.items
                      for p in items.staged_paths(request.template, it, False).values()]
            if staged:
                items.check_template(request.template, request.columns, False,
                                     request.append)
                _under_roots(staged, settings.input_roots)
            return build.build_job(request, settings, cache)
        except InputError as e:
            raise FieldError(e.where if not e.where.startswith("/") else "items",
                             e.problem) from e
        except ConfigError as e:
            raise FieldError("backend", str(e)) from e

    def piece_counts(self, settings: Settings, job: Job, task: Task) -> store.Count | None:
        return None if task.id == job.final_task else _items_count(settings, job, task)

    def piece_done(self, conn: redis.Redis, settings: Settings, job: Job, task: Task,
                   totals: dict[str, int] | None = None) -> None:
        if task.id == job.final_task:
            return
        straggler_after = float(job.params.get("straggler_after") or 0)
        if straggler_after:  # look for stragglers once the others had time to be done
            store.set_timer(conn, job.id, time.time() + straggler_after)
        if totals is None:  # not counted with its success
            counted = _items_count(settings, job, task)
            totals = store.count(conn, job.id, counted.piece, total=counted.total,
                                 **counted.amounts)
        limit = build.failure_limit(str(job.params.get("max_failures", "")),
                                    int(job.params["items"]))
        if limit is not None and totals.get("items_failed", 0) > limit:
            store.stop_job(conn, job.id, JobStatus.ERROR,
                           f"stopped early: {totals['items_failed']:,d} items failed, more "
                           f"than --max-failures {job.params['max_failures']}")

    def on_timer(self, conn: redis.Redis, settings: Settings, job: Job) -> None:
        """--straggler-after: once no piece is left waiting, start each piece running
        longer than that once more; the first of the two to finish wins."""
        after = float(job.params.get("straggler_after") or 0)
        if not after:
            return
        now = time.time()
        chunks = results.chunk_tasks(conn, job)
        states = results.states(conn, chunks)
        if any(s in (TaskStatus.QUEUED, TaskStatus.WAITING) for s in states):
            store.set_timer(conn, job.id, now + after)  # not at the end yet
            return
        pieces = set(chunks)
        next_look = None
        for task in store.running_tasks(conn, job.id):
            if task.id not in pieces or task.twin:
                continue
            if now - task.started < after:
                next_look = min(next_look or math.inf, task.started + after)
                continue
            twin = Task(name=f"{task.name} (again)"[:120], argv=task.argv, inputs=task.inputs,
                        outputs=task.outputs, environment=task.environment,
                        max_attempts=task.max_attempts, backend=task.backend,
                        host=task.host, queue=task.queue, twin_of=task.id)
            if store.add_twin(conn, job.id, twin):
                logs.note(conn, job.id, f"{task.name}: still running after {after:g}s while "
                          "the others are done; started once more (the first to finish "
                          "wins)", task=task.id)
        if next_look is not None:
            store.set_timer(conn, job.id, next_look)

    def describe(self, conn: redis.Redis, settings: Settings, job: Job) -> dict[str, Any]:
        return {"id": job.id, "status": job.status, "exit_code": job.exit_code,
                "error": job.error or None, **results.summary(conn, settings, job)}

    def export(self, conn: redis.Redis, settings: Settings, job: Job,
               out_dir: Path) -> dict[str, Any]:
        return results.export(conn, settings, job, out_dir)

    def items(self, conn: redis.Redis, settings: Settings, job: Job, state: str | None,
              after: str | None, limit: int) -> dict[str, Any]:
        return results.page(conn, settings, job, state, after, min(limit, PAGE))

    def item(self, conn: redis.Redis, settings: Settings, job: Job, key: str) -> dict[str, Any]:
        return results.item(conn, settings, job, key)
