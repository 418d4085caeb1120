"""The pull worker protocol over HTTPS (sheepdog.pullwork does the work).

Every request carries a token with the worker role and the protocol version in
X-Sheepdog-Protocol; a worker speaking another version is answered 426 naming both.
"""

from __future__ import annotations

import base64
import binascii
import select
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, send_file

from sheepdog import __version__, pullwork
from sheepdog.defaults import (
    PULL_CLAIM_WAIT,
    PULL_HEADER,
    PULL_PROTOCOL,
    PULL_RENEW_EVERY,
    PULL_SEGMENT,
)
from sheepdog.errors import FieldError
from sheepdog.models import Task
from sheepdog.params import Param, Params

from . import auth, bodies, state, stream

bp = Blueprint("workers", __name__, url_prefix="/api/v1/worker")


@bp.before_request
def same_protocol() -> Any:
    given = request.headers.get(PULL_HEADER, "")
    if given and given != str(PULL_PROTOCOL):
        response = jsonify(error=f"this service speaks sheepdog worker protocol "
                                 f"{PULL_PROTOCOL}; the worker speaks protocol {given}: "
                                 "run the same sheepdog version on both", status=426,
                           protocol=PULL_PROTOCOL)
        response.status_code = 426
        return response
    return None


@bp.after_request
def say_protocol(response: Response) -> Response:
    response.headers[PULL_HEADER] = str(PULL_PROTOCOL)
    return response


def _json() -> dict[str, Any]:
    body = bodies.read_json(state.settings().json_limit_mb << 20)
    if not isinstance(body, dict):
        raise FieldError("body", "a JSON object is needed")
    return body


def _name(body: dict[str, Any] | None = None) -> str:
    given = body.get("worker") if body is not None else request.args.get("worker")
    return pullwork.worker_name(g.identity.name, given)


CLAIM_MOST = 256  # pieces one claim hands out, however many slots a worker has
# the fields of the worker protocol's bodies, each declared once (see sheepdog.params)
FIELDS = Params(
    Param("queues", list, [], "The queues the worker serves (default: the service's)."),
    Param("slots", int, 1, "Pieces the worker can take now (one claim takes at most "
          f"{CLAIM_MOST}).", minimum=0),
    Param("wait", float, PULL_CLAIM_WAIT, "Seconds to wait for a piece.", minimum=0,
          maximum=PULL_CLAIM_WAIT),
    Param("leases", list, [], "The leases the worker holds."),
    Param("shas", list, [], "The blobs asked for."),
)


@bp.get("/hello")
def hello() -> Any:
    settings = state.settings()
    return jsonify(service="sheepdog", protocol=PULL_PROTOCOL, version=__version__,
                   lease_seconds=settings.lease_timeout, renew_every=PULL_RENEW_EVERY,
                   segment_bytes=PULL_SEGMENT, claim_wait=PULL_CLAIM_WAIT,
                   who=g.identity.name, batch_reports=True)


@bp.post("/claim")
def claim() -> Any:
    body = _json()
    name = _name(body)
    settings = state.settings()
    token = auth.given_token()
    pieces = _claim(body, name, FIELDS.fields(body)["wait"],
                    lambda: _client_gone() or auth.identify(token) is None)
    return jsonify(pieces=pieces, worker=name, lease_seconds=settings.lease_timeout)


def _claim(body: dict[str, Any], name: str, wait: float,
           client_gone: Callable[[], bool]) -> list[dict[str, Any]]:
    """Pieces for a claim: its own request's, or one riding on a report (`wait` 0)."""
    settings = state.settings()
    given = FIELDS.fields(body)
    queues = _queues(given["queues"], settings.queue)
    slots = min(max(1, given["slots"]), CLAIM_MOST)
    host = str(body.get("host") or request.remote_addr or "?")[:200]
    conn = state.conn()
    pullwork.announce(conn, settings, name, queues, slots, host)
    return pullwork.claim(conn, settings, state.cache(), name, host, queues, slots, wait,
                          stream.GOING_AWAY, str(body.get("instance") or ""), client_gone)


def _queues(asked: list[str], default: str) -> list[str]:
    """The queues a worker asks to serve: its token's own if it names none; 403 for one
    its token may not take pieces of."""
    who = g.identity
    queues = asked or list(who.queues) or [default]
    refused = next((q for q in queues if not who.serves(q)), None)
    if refused is not None:
        raise FieldError("queues", f"token {who.name} serves only the queues "
                         f"{', '.join(who.queues)}, not {refused[:100]!r}", 403)
    return queues


def _client_gone() -> bool:
    """Has the client closed its connection? A worker waiting for a claim's answer sends
    nothing, so its socket turning readable means it hung up (a killed worker)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:
        return False
    try:  # poll, not select: a busy service has descriptors past select's 1024
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


@bp.post("/leave")
def leave() -> Any:
    body = _json()
    pullwork.leave(state.conn(), _name(body), str(body.get("instance") or ""))
    return jsonify(ok=True)


@bp.post("/renew")
def renew() -> Any:
    body = _json()
    name = _name(body)
    conn, settings = state.conn(), state.settings()
    given = FIELDS.fields(body)
    leases, queues = given["leases"], _queues(given["queues"], settings.queue)
    pullwork.announce(conn, settings, name, queues, min(max(1, given["slots"]), CLAIM_MOST),
                      str(body.get("host") or "?")[:200])
    revoked = pullwork.renew(conn, settings, name, leases)
    pullwork.upkeep(conn, settings)
    return jsonify(revoked=revoked)


def _lines(body: dict[str, Any]) -> tuple[list[tuple[str, str]], dict[str, bytes]]:
    """A request's output lines and exact bytes (log batches, and a report's last ones)."""
    lines = body.get("lines", [])
    if not isinstance(lines, list) or not all(
            isinstance(ln, list) and len(ln) == 2 and all(isinstance(x, str) for x in ln)
            for ln in lines):
        raise FieldError("lines", "a list of [stream, text] pairs")
    raw_in = body.get("raw") or {}
    if not isinstance(raw_in, dict):
        raise FieldError("raw", "an object of stream -> base64 bytes")
    try:
        raw = {s: base64.b64decode(v, validate=True) for s, v in raw_in.items()
               if s in ("stdout", "stderr")}
    except (binascii.Error, TypeError) as e:
        raise FieldError("raw", f"not base64: {e}") from e
    return [(s, t) for s, t in lines], raw


@bp.post("/log")
def log() -> Any:
    body = _json()
    name = _name(body)
    lines, raw = _lines(body)
    pullwork.write_log(state.conn(), state.settings(), name, str(body.get("lease", "")),
                       lines, raw)
    return jsonify(ok=True)


@bp.get("/blobs/<sha>")
def get_blob(sha: str) -> Any:
    path = pullwork.blob_for(state.conn(), state.cache(), _name(),
                             request.args.get("lease", ""), sha)
    return send_file(path, mimetype="application/octet-stream", conditional=True,
                     etag=sha, max_age=0)


def _holder() -> str:
    """The worker's name, once it is known to hold the piece named by ?lease= (only a
    piece's holder may send files, and only while it holds it)."""
    name = _name()
    pullwork.held(state.conn(), name, request.args.get("lease", ""))
    return name


@bp.post("/fetch")
def fetch() -> Any:
    body = _json()
    shas = FIELDS.fields(body)["shas"]
    return jsonify(blobs=pullwork.small_blobs(state.conn(), state.cache(), _name(body),
                                              str(body.get("lease", "")), shas))


@bp.get("/uploads/<sha>")
def upload_state(sha: str) -> Any:
    return jsonify(pullwork.upload_state(state.cache(), _holder(), sha,
                                         request.args.get("lease", "")))


@bp.put("/uploads/<sha>")
def upload(sha: str) -> Any:
    name = _holder()
    try:
        offset = int(request.headers.get("Upload-Offset", "0"))
        total = int(request.headers["Upload-Length"])
    except (KeyError, ValueError) as e:
        raise FieldError("Upload-Length", "Upload-Offset and Upload-Length headers "
                         "(whole numbers) are needed") from e
    limit = state.settings().worker_upload_mb << 20
    if not 0 <= offset <= total <= limit:
        raise FieldError("Upload-Length", f"an output file is at most {limit:,d} bytes "
                         "(worker_upload_mb), its offset within it", 413)
    answer = pullwork.receive(state.cache(), name, sha, offset, total, request.stream,
                              request.args.get("lease", ""))
    return jsonify(answer), (201 if answer["complete"] else 202)


@bp.post("/finish")
def finish() -> Any:
    """A piece's report; or (`reports`) several pieces' reports in one request, each
    answered in `answers` in order. A `claim` rides on it: the next pieces come back in
    the answer (one request per piece for a busy worker, fewer when reports batch)."""
    body = _json()
    name = _name(body)
    reports = body.get("reports")
    if reports is None:
        answer = _finish_one(name, body)
        answered = [answer]
    elif not isinstance(reports, list) or not all(isinstance(r, dict) for r in reports):
        raise FieldError("reports", "a list of report objects")
    else:
        held = pullwork.read_held(state.conn(), [str(r.get("lease", "")) for r in reports])
        answered = [_finish_or_gone(name, r, h) for r, h in zip(reports, held, strict=True)]
        answer = {"answers": answered}
    wants = body.get("claim")
    if isinstance(wants, dict) and any(a.get("recorded") for a in answered):
        answer["pieces"] = _claim(wants, name, 0.0, lambda: False)
    return jsonify(answer), (409 if "missing" in answer else 200)


def _finish_one(name: str, report: dict[str, Any],
                held: tuple[Task | None, list[str]] | None = None) -> dict[str, Any]:
    lines, raw = _lines(report)
    return pullwork.finish(state.conn(), state.settings(), state.cache(), name,
                           str(report.get("lease", "")), report, lines, raw,
                           trusted=g.identity.trusted, held=held)


def _finish_or_gone(name: str, report: dict[str, Any],
                    held: tuple[Task | None, list[str]]) -> dict[str, Any]:
    """One report of a batch (its piece read with the others'): a piece no longer held
    is said in its own answer."""
    try:
        return _finish_one(name, report, held)
    except pullwork.Refused as e:
        return {"gone": str(e)}
