"""The REST API: POST/GET/DELETE /jobs, logs, results, health (see openapi.yaml)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any, NoReturn

from flask import Blueprint, Response, abort, jsonify, make_response, request, send_file, url_for

from sheepdog import logs, progress, store, workflow
from sheepdog.errors import ConfigError, InputError, SheepdogError
from sheepdog.gemma.workflows import GemmaRequest, build_job
from sheepdog.models import Job, JobStatus

from . import inputs, state

bp = Blueprint("api", __name__)

WORKFLOWS = ("command", "gemma-loco", "gemma-permute")
RESULT_FILES = {"assoc.txt": "text/plain", "manhattan.png": "image/png",
                "manhattan.svg": "image/svg+xml", "permutations.json": "application/json",
                "summary.json": "application/json"}
PARAMS = {"lmm": int, "maf": float, "column": int, "permutations": int, "seed": int,
          "batch_size": int, "force": bool}


def bad(field: str, message: str, code: int = 400) -> NoReturn:
    abort(make_response(jsonify(error=message, field=field, status=code), code))


def _body() -> dict[str, Any]:
    """The job description: a JSON body, or a multipart form's `job` field."""
    if request.mimetype == "multipart/form-data":
        raw = request.form.get("job")
        if raw is None:
            bad("job", "multipart requests carry the job description as a JSON field 'job'")
    else:
        raw = request.get_data(as_text=True)
    try:
        body = json.loads(raw or "")
    except json.JSONDecodeError as e:
        bad("body", f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}")
    if not isinstance(body, dict):
        bad("body", "the job description must be a JSON object")
    return body


def urls(job: Job) -> dict[str, str]:
    ws = url_for("job_stream", job_id=job.id, _external=True)  # werkzeug gives ws://
    return {"job": url_for("api.get_job", job_id=job.id),
            "log": url_for("api.get_log", job_id=job.id),
            "result": url_for("api.get_result", job_id=job.id),
            "stream": ws,
            "page": url_for("pages.job_page", job_id=job.id, token=job.read_token)}


def _params(raw: Any) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        bad("params", "must be an object")
    out = {}
    for key, value in raw.items():
        kind = PARAMS.get(key)
        if kind is None:
            bad(f"params.{key}", f"unknown parameter; known: {', '.join(PARAMS)}")
        ok = isinstance(value, bool) if kind is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            and (kind is float or float(value).is_integer()))
        if not ok and value is not None:
            bad(f"params.{key}", f"must be {'true/false' if kind is bool else kind.__name__}")
        out[key] = kind(value) if value is not None else None
    return out


def _gemma_job(body: dict[str, Any], workflow_name: str) -> tuple[Job, list[Any]]:
    settings = state.settings()
    raw_inputs = body.get("inputs", {})
    if not isinstance(raw_inputs, dict):
        bad("inputs", "must be an object mapping geno/pheno/anno/covariates to files")
    params = _params(body.get("params"))  # cheap checks before any file is touched
    files = {k: v for k, v in request.files.items()}
    try:
        paths = inputs.resolve(raw_inputs, files, settings.input_roots, settings.home)
    except InputError as e:
        bad(e.where, e.problem)
    if workflow_name == "gemma-permute":
        params.setdefault("permutations", 1000)
        if params["permutations"] < 1:
            bad("params.permutations", "must be at least 1")
    else:
        params["permutations"] = 0
    request_ = GemmaRequest(geno=paths["geno"], pheno=paths["pheno"], anno=paths["anno"],
                            covariates=paths.get("covariates"), backend=body.get("backend")
                            or "local", host=body.get("host") or "",
                            queue=body.get("queue") or "", **params)
    try:
        return build_job(request_, settings, state.local_store())
    except InputError as e:
        message = str(e)
        for role, path in paths.items():  # say which field, not where the server put it
            message = message.replace(str(path), f"inputs.{role}")
        bad(next((f"inputs.{r}" for r, p in paths.items() if str(p) == e.where), "inputs"),
            message)
    except ConfigError as e:
        bad("params", str(e))


@bp.post("/jobs")
def create_job() -> Any:
    body = _body()
    name = body.get("workflow")
    if name not in WORKFLOWS:
        bad("workflow", f"unknown workflow {name!r}; choose one of {', '.join(WORKFLOWS)}")
    if name == "command":
        command = body.get("command")
        if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
            bad("command", "must be a list of strings (the program and its arguments)")
        try:
            job, tasks = workflow.command_job(command, state.settings(),
                                              backend=body.get("backend") or "local",
                                              host=body.get("host"), queue=body.get("queue"),
                                              cwd=str(state.settings().home))
        except ConfigError as e:
            bad("command" if "command" in str(e) else "backend", str(e))
    else:
        job, tasks = _gemma_job(body, name)
    job.read_token = secrets.token_urlsafe(24)
    workflow.submit(state.conn(), state.settings(), job, tasks)
    return jsonify(id=job.id, status=job.status, read_token=job.read_token,
                   urls=urls(job)), 202


@bp.get("/jobs")
def list_jobs() -> Any:
    try:
        limit = min(200, max(1, int(request.args.get("limit", 50))))
        offset = max(0, int(request.args.get("offset", 0)))
    except ValueError:
        bad("limit", "limit and offset must be whole numbers")
    conn = state.conn()
    jobs = [progress.job_view(conn, j, with_pieces=False) for j in
            store.list_jobs(conn, limit=limit, offset=offset)]
    total = store.count_jobs(conn)
    return jsonify(jobs=jobs, total=total, limit=limit, offset=offset,
                   next=offset + limit if offset + limit < total else None)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Any:
    conn = state.conn()
    job = store.get_job(conn, job_id)
    view = progress.job_view(conn, job)
    view["urls"] = urls(job)
    return jsonify(view)


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
    if job.status != JobStatus.SUCCESS.value:
        bad("job_id", f"job {job_id} is {job.status}; results exist once it succeeded", 409)
    return job


@bp.get("/jobs/<job_id>/result")
def get_result(job_id: str) -> Any:
    job = _finished(job_id)
    if not job.workflow.startswith("gemma"):
        return jsonify(id=job.id, status=job.status, exit_code=job.exit_code)
    from sheepdog.gemma.result import describe

    result = describe(state.conn(), state.settings(), job)
    result["urls"] = {name: url_for("api.get_result_file", job_id=job_id, name=name)
                      for name in RESULT_FILES}
    return jsonify(result)


@bp.get("/jobs/<job_id>/result/<name>")
def get_result_file(job_id: str, name: str) -> Any:
    job = _finished(job_id)
    if name not in RESULT_FILES or not job.workflow.startswith("gemma"):
        bad("name", f"no result file {name!r}; available: {', '.join(RESULT_FILES)}", 404)
    if name == "permutations.json" and job.workflow != "gemma-permute":
        bad("name", "permutations.json exists for gemma-permute jobs only", 404)
    task = job.params["permutation_task"] if name == "permutations.json" else \
        job.params["scan_task"]
    path: Path = state.local_store().task_dir(task) / name
    if not path.is_file():
        bad("name", f"{name} is no longer in the cache", 410)
    return send_file(path, mimetype=RESULT_FILES[name])


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
    return send_file(Path(__file__).parent / "openapi.yaml", mimetype="application/yaml")
