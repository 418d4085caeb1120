"""The REST API: POST/GET/DELETE /jobs, logs, results, health (see openapi.yaml)."""

from __future__ import annotations

import functools
import json
import re
import secrets
from typing import Any, NoReturn
from urllib.parse import urlencode

from flask import Blueprint, Response, abort, g, jsonify, make_response, request, send_file, url_for

from sheepdog import jobs, keys, logs, progress, store, workflows
from sheepdog.defaults import PIECES_PAGE
from sheepdog.errors import FieldError, SheepdogError
from sheepdog.models import Job, JobStatus

from . import auth, bodies, inputs, prepare, spec, state

bp = Blueprint("api", __name__)

MAX_OFFSET = 2**31  # beyond any job count; larger numbers are not Redis integers


def bad(field: str, message: str, code: int = 400) -> NoReturn:
    abort(make_response(jsonify(error=message, field=field, status=code), code))


def _body() -> dict[str, Any]:
    """The job description: a JSON body, or a multipart form's `job` field."""
    limit = state.settings().json_limit_mb << 20
    if request.mimetype == "multipart/form-data":
        raw = request.form.get("job")
        if raw is None:
            bad("job", "multipart requests carry the job description as a JSON field 'job'")
        if len(raw) > limit:
            bad("job", f"the job description is over {limit:,d} bytes (json_limit_mb)", 413)
    else:
        try:  # read in pieces, refused as soon as it passes the limit (chunked too)
            raw = bodies.read(limit).decode(errors="replace")
        except FieldError:
            bad("body", f"the job description is over {limit:,d} bytes (json_limit_mb)", 413)
    try:
        body = json.loads(raw or "")
    except json.JSONDecodeError as e:
        bad("body", f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, nesting 100,000 deep
        bad("body", f"unusable JSON: {str(e)[:120] or type(e).__name__}")
    if not isinstance(body, dict):
        bad("body", "the job description must be a JSON object")
    return body


def urls(job: Job) -> dict[str, str]:
    """The job's links, all under its own URL (every POST /jobs answer carries them);
    the stream's is absolute, ws:// or wss:// as the request came."""
    before, after, ws = _bases(*map(request.environ.get, _URL_PARTS))
    own = (f"{before}{job.id}{after}" if _PLAIN_ID.fullmatch(job.id)
           else url_for("api.get_job", job_id=job.id))
    return {"job": own, "log": f"{own}/log", "result": f"{own}/result",
            "stream": f"{ws}{own}/stream",
            "page": f"{own}/page?{urlencode({'token': job.read_token})}"}


# what a job's URL depends on besides its id (ProxyFix has applied the proxy's headers)
_URL_PARTS = ("wsgi.url_scheme", "HTTP_HOST", "SERVER_NAME", "SERVER_PORT", "SCRIPT_NAME")
_PLAIN_ID = re.compile(r"[A-Za-z0-9._~-]+")  # written into a URL as it is
_MARK = "sheepdog-job-id"


@functools.lru_cache(maxsize=256)
def _bases(*_parts: str | None) -> tuple[str, str, str]:
    """(a job's URL before its id, after it, the websocket origin) for requests that came
    to this host this way: url_for and host_url once, not for every job (they were 7% of
    a POST's CPU). Called in the request whose environ `_parts` are."""
    own = url_for("api.get_job", job_id=_MARK)
    scheme, host = request.host_url.split("://", 1)
    before, _, after = own.partition(_MARK)
    return before, after, f"{scheme.replace('http', 'ws', 1)}://{host.rstrip('/')}"


# what a read token (a shared page link) must not show: server paths, worker host names
_PRIVATE = {"out_dir", "path", "worker", "host", "files", "sheepdog", "lmdb", "cwd"}


def _for_reader(view: Any) -> Any:
    """The view as a job's read token may see it (API tokens see everything)."""
    if g.get("job_scope") is None:
        return view
    if isinstance(view, dict):
        return {k: _for_reader(v) for k, v in view.items() if k not in _PRIVATE}
    if isinstance(view, list):
        return [_for_reader(v) for v in view]
    return view


def _check_placement(body: dict[str, Any]) -> None:
    """backend, host, queue: strings, and a queue some worker serves (or the default),
    so a job is never accepted that nothing will ever run."""
    for name in ("backend", "host", "queue"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            bad(name, f"must be a string, got {type(value).__name__}")
    queue = body.get("queue")
    settings = state.settings()
    if not queue or queue == settings.queue or settings.allow_any_queue:
        return
    if not state.conn().sismember(keys.queues_served(), queue):
        bad("queue", f"no worker has ever served queue {queue!r}; start one "
                     f"(sheepdog worker --queue {queue}) or leave queue out")


@bp.post("/jobs")
def create_job() -> Any:
    body = _body()
    workflow = workflows.get(body.get("workflow"))
    known = {"workflow", "backend", "host", "queue", *workflow.schema().get("properties", {})}
    unknown = sorted(set(body) - known)
    if unknown:  # a typo must not be silently ignored (an unknown param is not either)
        bad(unknown[0][:80], f"unknown field for a {workflow.name} job; known: "
                             f"{', '.join(sorted(known))}")
    if workflow.runs_commands:
        auth.require("admin", f"a {workflow.name} job (it runs any program as the service)")
    _check_placement(body)
    settings = state.settings()
    uploads = dict(request.files.items()) if request.mimetype == "multipart/form-data" else {}
    where, files = inputs.save_uploads(uploads, settings.home)
    job, tasks = prepare.prepare(workflow.name, body, files, where, settings,
                                 g.identity.name)
    job.read_token = secrets.token_urlsafe(24)
    jobs.submit(state.conn(), state.settings(), job, tasks)
    # as jsonify writes it, without its provider's dispatch (sorted keys, compact)
    answer = {"id": job.id, "read_token": job.read_token, "status": job.status,
              "urls": urls(job)}
    return Response(json.dumps(answer, separators=(",", ":"), sort_keys=True) + "\n", 202,
                    mimetype="application/json")


def _page(default: int, most: int) -> tuple[int, int]:
    """offset and limit from the query string, clamped."""
    try:
        limit = min(most, max(1, int(request.args.get("limit", default))))
        offset = min(MAX_OFFSET, max(0, int(request.args.get("offset", 0))))
    except ValueError:
        bad("limit", "limit and offset must be whole numbers")
    return offset, limit


@bp.get("/jobs")
def list_jobs() -> Any:
    offset, limit = _page(50, 200)
    conn = state.conn()
    views = [progress.job_view(conn, j, with_pieces=False) for j in
             store.list_jobs(conn, limit=limit, offset=offset)]
    total = store.count_jobs(conn)
    return jsonify(jobs=views, total=total, limit=limit, offset=offset,
                   next=offset + limit if offset + limit < total else None)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    conn = state.conn()
    job = store.get_job(conn, job_id)
    offset, limit = _page(PIECES_PAGE, PIECES_PAGE)  # one page of pieces
    view = progress.job_view(conn, job, offset=offset, limit=limit)
    view["urls"] = urls(job)
    return jsonify(_for_reader(view))


@bp.get("/jobs/<job_id>/log")
def get_log(job_id: str) -> Any:
    conn = state.conn()
    job = store.get_job(conn, job_id)
    try:
        limit = min(10_000, max(1, int(request.args.get("limit", 1000))))
    except ValueError:
        bad("limit", "must be a whole number")
    after = request.args.get("after", "0-0")
    try:
        lines = logs.read(conn, job_id, after=after, count=limit)
    except SheepdogError:
        raise
    except Exception:  # redis rejects a malformed stream id
        bad("after", f"{after!r} is not a log id (like 1700000000000-0)")
    return jsonify(lines=[ln.as_dict() for ln in lines],
                   next_after=lines[-1].id if lines else after,
                   ended=JobStatus(job.status).final)


def _finished(job_id: str) -> Job:
    job = store.get_job(state.conn(), job_id)
    workflow = workflows.find(job.workflow)
    partial = workflow is not None and workflow.partial_results and job.status.final
    if job.status != JobStatus.SUCCESS and not partial:
        bad("job_id", f"job {job_id} is {job.status}; results exist once it succeeded", 409)
    return job


ITEM_STATES = ("success", "failed", "timeout", "error", "queued", "running", "skipped",
               "missing")


@bp.get("/jobs/<job_id>/items")
def get_items(job_id: str) -> Any:
    """One page of a many-item job's items, in input order (?state=&after=KEY&limit=)."""
    conn = state.conn()
    job = store.get_job(conn, job_id)
    item_state = request.args.get("state") or None
    if item_state is not None and item_state not in ITEM_STATES:
        bad("state", f"{item_state[:40]!r} is not an item state; one of "
                     f"{', '.join(ITEM_STATES)}")
    _, limit = _page(100, 100)
    workflow = workflows.get(job.workflow)
    return jsonify(_for_reader(workflow.items(conn, state.settings(), job, item_state,
                                              request.args.get("after"), limit)))


@bp.get("/jobs/<job_id>/items/<path:key>")
def get_item(job_id: str, key: str) -> Any:
    """One item by key: 200 with its output, 404 no such item, 409 not finished/failed."""
    conn = state.conn()
    job = store.get_job(conn, job_id)
    workflow = workflows.get(job.workflow)
    return jsonify(_for_reader(workflow.item(conn, state.settings(), job, key)))


@bp.get("/jobs/<job_id>/result")
def get_result(job_id: str) -> Any:
    job = _finished(job_id)
    workflow = workflows.find(job.workflow)
    if workflow is None:
        return jsonify(id=job.id, status=job.status, exit_code=job.exit_code)
    result = workflow.describe(state.conn(), state.settings(), job)
    if workflow.result_files:
        result["urls"] = {name: url_for("api.get_result_file", job_id=job_id, name=name)
                          for name in workflow.result_files}
    return jsonify(_for_reader(result))


@bp.get("/jobs/<job_id>/result/<name>")
def get_result_file(job_id: str, name: str) -> Any:
    job = _finished(job_id)
    workflow = workflows.find(job.workflow)
    if workflow is None or name not in workflow.result_files:
        available = ", ".join(workflow.result_files) if workflow else "none"
        bad("name", f"no result file {name!r}; available: {available}", 404)
    path = workflow.result_file(state.settings(), job, name)
    return send_file(path, mimetype=workflow.result_files[name])


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> Any:
    conn = state.conn()
    changed = store.cancel_job(conn, job_id)
    job = store.get_job(conn, job_id)
    return jsonify(id=job_id, status=job.status, cancelled=changed)


@bp.get("/health")
def health() -> Any:
    try:
        state.conn().ping()
    except SheepdogError as e:
        return jsonify(status="error", error=str(e)), 503
    return jsonify(status="ok")


@bp.get("/favicon.ico")
def favicon() -> Any:
    return "", 204


@bp.get("/openapi.yaml")
def openapi() -> Response:
    """The OpenAPI document: web/openapi.yaml with every workflow's request schema."""
    return Response(spec.document_yaml(), mimetype="application/yaml")
