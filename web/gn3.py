"""GN3's endpoints, with GN3's response shapes and error codes.

For a sheepdog job the id is the job id; for a job that came through GN3's own Redis
queue the GN3 hash name (`cmd::...`) works too.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from sheepdog import store
from sheepdog.errors import UnknownJob
from sheepdog.models import JobStatus

from . import state

bp = Blueprint("gn3", __name__, url_prefix="/api")


def _gn3_hash(job_id: str) -> dict[str, str] | None:
    if not job_id.startswith("cmd::"):
        return None
    raw = state.conn().hgetall(job_id)
    return {k.decode(): v.decode(errors="replace") for k, v in raw.items()} if raw else None


def _state(job_id: str) -> dict[str, Any] | None:
    """The whole job as GN3 shows a command's hash: cmd, status, result, stderr..."""
    legacy = _gn3_hash(job_id)
    if legacy is not None:
        return legacy
    try:
        job = store.get_job(state.conn(), job_id)
    except UnknownJob:
        return None
    from sheepdog.gn3 import output_text

    out: dict[str, Any] = {"cmd": job.command or job.workflow, "status": job.status,
           "result": "", "exit_code": job.exit_code, "workflow": job.workflow}
    if job.status == JobStatus.SUCCESS:
        out["result"] = output_text(state.conn(), job.id, "stdout") if not job.result \
            else job.result
    elif job.status == JobStatus.ERROR:
        out["stderr"] = output_text(state.conn(), job.id, "stderr") or job.error
        out["result"] = out["stderr"]
    return out


@bp.get("/async_commands/state/<job_id>")
def async_command_state(job_id: str) -> Any:
    found = _state(job_id)
    if found is None:
        return jsonify(error=f"No command with id {job_id}", status="error"), 404
    return jsonify(found)


@bp.get("/gemma/status/<job_id>")
def gemma_status(job_id: str) -> Any:
    found = _state(job_id)
    if found is None:
        return jsonify(error=f"No job with id {job_id}", status="error"), 404
    return jsonify(status=found["status"])
