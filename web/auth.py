"""API tokens and their roles, per-job read tokens, and CORS.

Every endpoint but /health needs `Authorization: Bearer <token>`; browsers' websockets
and shared page links may pass it as `?token=`. A token's role (sheepdog.tokens) must
grant what the endpoint needs: reading (GET), submitting (POST, DELETE), a pull
worker's protocol (the workers blueprint). Jobs that run any command also need the
admin role (api.create_job asks). A job's own read token (in its page link) opens that
job's read-only endpoints and nothing else.
"""

from __future__ import annotations

import secrets
from typing import Any
from urllib.parse import urlencode, urlparse

from flask import Flask, Response, abort, g, redirect, render_template, request
from werkzeug.wrappers import Response as WerkzeugResponse

from sheepdog import store, tokens
from sheepdog.tokens import Identity

from . import state

PUBLIC = {"api.health", "static", "api.openapi", "api.favicon"}
GN3_READ = {"gn3.async_command_state", "gn3.gemma_status"}  # open with gn3_routes_open
# endpoints a job's read token may open: (endpoint, methods)
JOB_READ = {"api.get_job", "api.get_log", "api.get_result", "api.get_result_file",
            "api.get_items", "api.get_item", "pages.job_page", "job_stream"}


def given_token() -> str:
    """The token the request carries (header, else ?token=), '' if none."""
    return _given_token()


COOKIE = "sheepdog_token"  # an API token a page was opened with, kept out of its links


def _cross_site() -> bool:
    """A state-changing request whose only credential is the browser's cookie, from
    anywhere but this service's own pages (SameSite=Strict keeps other sites out, not
    sibling subdomains; a plain-text POST needs no preflight)."""
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    if request.headers.get("Authorization") or request.args.get("token"):
        return False  # a token the client sent on purpose: no browser adds those
    if not request.cookies.get(COOKIE):
        return False
    origin = request.headers.get("Origin")
    if origin:
        return urlparse(origin).netloc != request.host
    return request.headers.get("Sec-Fetch-Site") != "same-origin"


def _given_token() -> str:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer "):].strip()
    return request.args.get("token", "") or request.cookies.get(COOKIE, "")


def identify(token: str) -> Identity | None:
    return state.token_registry().identify(token)


def is_api_token(token: str) -> bool:
    """A token of an API user who may read (a page keeps it in a cookie, not its links)."""
    found = identify(token)
    return found is not None and found.may("read")


WORKER_BLUEPRINT = "workers"  # the pull worker protocol: only tokens with the worker role


def needed_role(endpoint: str, method: str) -> str:
    if endpoint.split(".", 1)[0] == WORKER_BLUEPRINT:
        return "worker"
    return "read" if method in ("GET", "HEAD") else "submit"


def require(role: str, why: str) -> None:
    """Abort 403 unless the request's token has this role too (inside a request that
    passed check())."""
    who: Identity | None = g.get("identity")
    if who is None or not who.may(role):
        abort(403, f"{why} needs a token with the {role} role")


def check() -> Any:
    """before_request: 401 unless the request carries a token that opens this endpoint,
    403 if its role does not allow it. A browser asking for a page gets a page that
    says how to open it, not a JSON error."""
    endpoint = request.endpoint or ""
    if endpoint in PUBLIC or request.method == "OPTIONS":
        return
    if endpoint in GN3_READ and state.settings().gn3_routes_open:
        return  # GN3 serves these two without a token; GN2 sends none
    given = _given_token()
    g.job_scope = None
    g.identity = identify(given)
    if g.identity is not None and _cross_site():
        abort(403, "a request that changes something, sent with a page's cookie, must "
                   "come from this service's own pages (its Origin); send the token in an "
                   "Authorization header instead")
    if g.identity is not None:
        need = needed_role(endpoint, request.method)
        if not g.identity.may(need):
            abort(403, f"this token ({g.identity.name}, role {g.identity.role}) may not "
                       f"{request.method} {request.path}: that needs the {need} role")
        return
    g.job_scope = _job_scope(given, endpoint)
    accept = request.accept_mimetypes  # a browser prefers HTML; curl's */* does not
    if g.job_scope is None and endpoint.startswith("pages.") and \
            accept["text/html"] > accept["application/json"]:
        return render_template("signin.html", wrong=bool(given)), 401
    if g.job_scope is None:
        abort(401, "a valid API token is needed: Authorization: Bearer <token>")
    return None


# compared against when a job has no read token (or does not exist): the same work, and
# the same 401, either way, so neither answer nor time tells which ids exist
_NO_TOKEN = secrets.token_urlsafe(24)


def _job_scope(given: str, endpoint: str) -> str | None:
    """The job a job's read token opens (GET of that job's views only), else None."""
    job_id = (request.view_args or {}).get("job_id")
    if not (given and job_id and endpoint in JOB_READ and request.method == "GET"):
        return None
    expected = store.job_read_token(state.conn(), job_id)
    matches = tokens.same(given, expected or _NO_TOKEN)
    return job_id if matches and expected else None


def cors(response: Response) -> Response:
    origin = request.headers.get("Origin", "")
    allowed = state.settings().cors_origins
    if origin and (origin in allowed or "*" in allowed):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Vary"] = "Origin"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
    return response


def init_app(app: Flask) -> None:
    app.before_request(check)
    app.after_request(cors)


def page_token() -> Any:
    """The token a page may put in its links and its own requests: a job's read token
    (made to be shared), never an API token (those travel in the HttpOnly cookie)."""
    given = _given_token()
    return "" if is_api_token(given) else given


def token_to_cookie() -> WerkzeugResponse | None:
    """A page opened with ?token=<API token>: keep the token in an HttpOnly cookie and
    send the browser to the same page without it, so no link or history entry holds it."""
    given = request.args.get("token", "")
    if not is_api_token(given):
        return None
    args = {k: v for k, v in request.args.items() if k != "token"}
    target = request.path + (("?" + urlencode(args)) if args else "")
    response = redirect(target, code=303)
    response.set_cookie(COOKIE, given, httponly=True, samesite="Strict",
                        secure=request.is_secure, path="/")
    return response
