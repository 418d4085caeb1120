"""sheepdog's web service: the REST API GN3 calls, websocket log streams, progress pages."""

from __future__ import annotations

import gc
import os
import threading
from types import SimpleNamespace
from typing import Any

import redis
from flask import Flask, jsonify
from flask_sock import Sock
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix

from sheepdog import config, workflows
from sheepdog.defaults import SERVE_WARM_CONNECTIONS
from sheepdog.errors import FieldError, RedisUnavailable, SheepdogError

sock = Sock()
RETRY_AFTER = 5  # s: what a client is told to wait while Redis is unreachable


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """The app factory (gunicorn: `web:create_app()`)."""
    app = Flask(__name__)
    settings = config.load(**(test_config or {}).pop("SETTINGS", {}))
    app.config.update(
        SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.upload_limit_mb * 1024 * 1024,
        SOCK_SERVER_OPTIONS={"ping_interval": 25},
    )
    if test_config:
        app.config.update(test_config)
    sock.init_app(app)

    from . import api, auth, gn3, inputs, metrics, pages, state, stream, workers

    auth.init_app(app)
    # what a workflow's own routes get from the service, instead of importing it
    services = SimpleNamespace(conn=state.conn, token_to_cookie=auth.token_to_cookie)
    app.register_blueprint(api.bp)
    app.register_blueprint(gn3.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(workers.bp)
    app.register_blueprint(metrics.bp)
    for name in workflows.names():  # a workflow's own routes (a precompute's datasets)
        workflow = workflows.find(name)
        own = workflow.blueprint(services) if workflow is not None else None
        if own is not None:
            app.register_blueprint(own)
    stream.register(sock)
    app.wsgi_app = stream.own_socket(app.wsgi_app)  # type: ignore[method-assign]
    if settings.trusted_proxies:  # the scheme and client the proxy saw, not the proxy
        hops = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops,  # type: ignore[method-assign]
                                x_host=hops)
    if os.environ.get("SHEEPDOG_SERVE") and threading.current_thread() is threading.main_thread():
        stream.on_stop_signals()  # gunicorn's worker, loading the app in its main thread
        # what loading left (modules, the app) is never garbage: the collector's full
        # passes skip it, instead of stalling every open request ~0.1 s now and then
        gc.collect()
        gc.freeze()
        from . import state

        with app.app_context():  # connections made now, not by the first burst's requests
            state.warm(SERVE_WARM_CONNECTIONS)
    app.teardown_request(lambda _error: inputs.discard_uploads())

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Any:
        return jsonify(error=e.description, status=e.code), e.code

    @app.errorhandler(RedisUnavailable)
    @app.errorhandler(redis.ConnectionError)
    @app.errorhandler(redis.TimeoutError)
    def redis_down(e: Exception) -> Any:
        # the service is fine, its store is not there right now: come back shortly
        response = jsonify(error=f"the job store (Redis) is unreachable: {e}", status=503)
        response.status_code = 503
        response.headers["Retry-After"] = str(RETRY_AFTER)
        return response

    @app.errorhandler(FieldError)
    def field_error(e: FieldError) -> Any:
        return jsonify(error=e.problem, field=e.field, status=e.http_status), e.http_status

    @app.errorhandler(SheepdogError)
    def sheepdog_error(e: SheepdogError) -> Any:
        return jsonify(error=str(e), status=e.http_status), e.http_status

    return app
