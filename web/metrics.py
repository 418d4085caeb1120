"""GET /metrics: the service in Prometheus's text format, for an operator's Prometheus or
Grafana (a read token, as `bearer_token` in the scrape config): jobs, active pieces,
what waits on each queue, live workers, and how long Redis takes to answer."""

from __future__ import annotations

import time

from flask import Blueprint, Response

from sheepdog import dispatch, keys, registration, store

from . import state

bp = Blueprint("metrics", __name__)


def _line(name: str, value: float, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value:g}"]


@bp.get("/metrics")
def metrics() -> Response:
    conn = state.conn()
    started = time.monotonic()
    conn.ping()
    ping = time.monotonic() - started
    workers = registration.live_workers(conn)
    served = {str(q) for w in workers for q in list(w.get("queues") or [])}  # type: ignore[call-overload]
    queues = sorted(served | {state.settings().queue})
    lines = [
        *_line("sheepdog_jobs", store.count_jobs(conn), "Jobs Redis holds (any status)."),
        *_line("sheepdog_pieces_active", int(conn.scard(keys.active_tasks())),
               "Pieces queued or running now."),
        *_line("sheepdog_workers", len(workers), "Live workers (Redis and pull)."),
        *_line("sheepdog_redis_ping_seconds", ping, "How long Redis took to answer a PING."),
        "# HELP sheepdog_queue_waiting Pieces waiting on a queue.",
        "# TYPE sheepdog_queue_waiting gauge",
        *(f'sheepdog_queue_waiting{{queue="{q}"}} {dispatch.waiting(conn, q)}' for q in queues),
    ]
    return Response("\n".join(lines) + "\n", mimetype="text/plain; version=0.0.4")
