"""GN3's endpoints, answered as GN3 answers them (bodies and status codes).

For a sheepdog job the id is the job id; for a command that came through GN3's own
Redis queue the GN3 hash name (`cmd::...`) works too. With the setting
`gn3_routes_open` these two read-only routes need no token, as in GN3.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from sheepdog import logs, store
from sheepdog.errors import UnknownJob
from sheepdog.models import JobStatus

from . import state

bp = Blueprint("gn3", __name__, url_prefix="/api")

# GN3's own words (gn3/api/async_commands.py, gn3/api/gemma.py)
NO_COMMAND = "The command id provided does not exist."
NO_ID = "The unique id you used does not exist!"


def _gn3_hash(job_id: str) -> dict[str, str] | None:
    raw = state.conn().hgetall(job_id) if job_id.startswith("cmd::") else None
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()} if raw else None


def _output(job_id: str, stream: str) -> str:
    lines: list[str] = []
    after = "0-0"
    while batch := logs.read(state.conn(), job_id, after=after):
        lines += [ln.text for ln in batch if ln.stream == stream]
        after = batch[-1].id
    return "\n".join(lines) + ("\n" if lines else "")


def _state(job_id: str) -> dict[str, Any] | None:
    """The whole job as GN3 shows a command's hash: cmd, status, result, stderr..."""
    legacy = _gn3_hash(job_id)
    if legacy is not None:
        return legacy
    try:
        job = store.get_job(state.conn(), job_id)
    except UnknownJob:
        return None
    out: dict[str, Any] = {"cmd": job.command or job.workflow, "status": job.status,
                           "result": "", "exit_code": job.exit_code, "workflow": job.workflow}
    if job.status == JobStatus.SUCCESS:
        out["result"] = _output(job.id, "stdout") if not job.result else job.result
    elif job.status == JobStatus.ERROR:
        out["stderr"] = _output(job.id, "stderr") or job.error
        out["result"] = out["stderr"]
    return out


@bp.get("/async_commands/state/<job_id>")
def async_command_state(job_id: str) -> Any:
    found = _state(job_id)
    if found is None:
        return jsonify(error=NO_COMMAND, status="error"), 404
    return jsonify(found)


@bp.get("/gemma/status/<job_id>")
def gemma_status(job_id: str) -> Any:
    found = _state(job_id)
    if found is None:
        return jsonify(status=128, error=NO_ID), 500  # GN3 answers an unknown id so
    return jsonify(status=found["status"])
