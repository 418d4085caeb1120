"""What `sheepdog status JOB`, `list`, `logs JOB` and `result JOB` read and print, for
both sheepdog.quick (over sheepdog.wire, without redis-py or click) and the full
command line: the same functions, so the two cannot drift apart. Each reader returns
the lines to print, with the stream each goes to."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from . import config, logs, progress, store
from .errors import SheepdogError
from .logs import LogLine
from .models import Job, JobStatus

Shown = list[tuple[str, str]]  # (stdout | stderr | stderr-dim, text) to print in order


def _status(conn: Any, job_id: str, as_json: bool) -> Shown:
    view = progress.job_view(conn, store.get_job(conn, job_id))
    return [("stdout", json_text(view))] if as_json else [
        ("stdout", line) for line in status_lines(view, job_id)]


def _list(conn: Any, job_id: str, as_json: bool) -> Shown:
    jobs = store.list_jobs(conn)
    if as_json:
        return [("stdout", json_text([progress.job_view(conn, j, with_pieces=False)
                                      for j in jobs]))]
    return [("stdout", line) for line in list_lines(jobs)]


def _logs(conn: Any, job_id: str, as_json: bool) -> Shown:
    store.get_job(conn, job_id)  # an unknown job is said so
    lines: list[LogLine] = []
    after = "0-0"
    while batch := logs.read(conn, job_id, after=after):
        lines.extend(batch)
        after = batch[-1].id
    return [("stdout", json.dumps(line.as_dict())) if as_json else log_line(line)
            for line in lines]


def _result(conn: Any, job_id: str, as_json: bool) -> Shown:
    """A finished job's result, for a workflow whose result is the job's own record (a
    command's); any other is described by its workflow, through the full command line."""
    from . import workflows  # here: `status`, `list` and `logs` need none

    job = store.get_job(conn, job_id)
    workflow = workflows.find(job.workflow)
    if (workflow is None or job.status != JobStatus.SUCCESS
            or type(workflow).describe is not workflows.Workflow.describe):
        raise Elsewhere  # and the full command line says why there is no result
    found = workflow.describe(conn, config.load(), job)
    return [("stdout", json_text(found if as_json else shortened(found)))]


class Elsewhere(SheepdogError):
    """What the full command line is to answer (it says why)."""


READS: dict[str, Callable[[Any, str, bool], Shown]] = {
    "status": _status, "list": _list, "logs": _logs, "result": _result}


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)


def shortened(value: Any, most: int = 10) -> Any:
    """A result a person reads: every list cut to its first `most` entries, saying how
    many more there are (`--json` prints them all)."""
    if isinstance(value, dict):
        return {k: shortened(v, most) for k, v in value.items()}
    if isinstance(value, list) and len(value) > most:
        return [*(shortened(v, most) for v in value[:most]),
                f"... {len(value) - most:,d} more (--json: all)"]
    if isinstance(value, list):
        return [shortened(v, most) for v in value]
    return value


def dim(text: str) -> str:
    return f"\x1b[2m{text}\x1b[0m"  # as click.style(dim=True), on a terminal only


def status_lines(view: dict[str, Any], job_id: str) -> list[str]:
    """`sheepdog status JOB` as a person reads it."""
    p = view["progress"]
    lines = [f"{view['id']}  {view['status']}  exit={view['exit_code']}  "
             f"{p['done']}/{p['total']} pieces ({p['cached']} cached)  {view['workflow']}"]
    if view["error"]:
        lines.append(f"error: {view['error']}")
    for piece in view["pieces"]:
        lines.append(f"  {piece['status']:<9} {piece['name']:<28} attempts={piece['attempts']}"
                     + (f"  {piece['error']}" if piece["error"] else ""))
    if view["pieces_next"] is not None:
        lines.append(f"  … {view['pieces_total'] - view['pieces_next']:,d} more "
                     f"(sheepdog status {job_id} --offset {view['pieces_next']})")
    return lines


def list_lines(jobs: list[Job]) -> list[str]:
    """`sheepdog list`: a header naming the columns (none when there is nothing)."""
    lines = [f"{'JOB':<26}  {'STATUS':<9} {'EXIT':>4}  {'PIECES':<9}  WHAT"] if jobs else []
    for j in jobs:
        what = " ".join(j.command) if j.command else j.workflow
        code = "" if j.exit_code is None else j.exit_code
        lines.append(f"{j.id:<26}  {j.status:<9} {code!s:>4}  {f'{j.done}/{j.total}':<9}  "
                     f"{what[:60]}")
    return lines


def log_line(line: LogLine) -> tuple[str, str]:
    """Where a log line goes and what it says: a command's own streams as they were,
    sheepdog's notes on stderr, dim on a terminal."""
    if line.stream in ("stdout", "stderr"):
        return line.stream, line.text
    return "stderr-dim", f"[sheepdog] {line.text}"
