"""The websocket stream of one job: replay from `after`, then live lines, progress and
status events, and a final `end` event. A client that reconnects with the last line id
it saw misses nothing and gets nothing twice (line ids only grow)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import request
from flask_sock import Sock

from sheepdog import logs, progress, store
from sheepdog.defaults import PIECES_PAGE, PROGRESS_EVERY
from sheepdog.errors import UnknownJob
from sheepdog.models import JobStatus

from . import auth, state


def _progress_event(conn: Any, job_id: str) -> dict[str, Any]:
    """Counts, and each piece only while the whole job fits one page: a job of
    100,000 pieces sends the same few hundred bytes as a LOCO scan."""
    whole = store.count_tasks(conn, job_id) <= PIECES_PAGE
    view = progress.job_view(conn, store.get_job(conn, job_id),
                             limit=PIECES_PAGE if whole else 0)
    return {"type": "progress", "status": view["status"], "progress": view["progress"],
            "pieces": [{"name": p["name"], "status": p["status"],
                        "attempts": p["attempts"]} for p in view["pieces"]],
            "pieces_total": view["pieces_total"], "error": view["error"]}


LOG_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
POLICY_VIOLATION = 1008  # websocket close code: the request itself is wrong
REFUSE_LINGER = 0.1  # s between a refusal's error event and its close


def _refuse(ws: Any, field: str, message: str) -> None:
    """A clear error event, then a close that says why (never a traceback)."""
    ws.send(json.dumps({"type": "error", "field": field, "error": message}))
    time.sleep(REFUSE_LINGER)  # let the client read the event before the close arrives
    ws.close(reason=POLICY_VIOLATION, message=message[:120])


def follow(ws: Any, job_id: str, after: str) -> None:
    conn = state.conn()
    after = after or "0-0"
    if not LOG_ID.fullmatch(after):
        _refuse(ws, "after", f"{after[:40]!r} is not a log id (like 1700000000000-0)")
        return
    try:
        store.get_job(conn, job_id)
    except UnknownJob as e:
        _refuse(ws, "job_id", str(e))
        return
    cursors = {job_id: after}
    sent, beat = None, 0.0
    while ws.connected:  # a client that went away frees its thread within one round
        lines = logs.tail(conn, cursors)
        ended = False
        for _, line in lines:
            ws.send(json.dumps({"type": "line", **line.as_dict()}))
            ended = ended or line.end
        last = cursors[job_id]
        now = time.monotonic()
        if ended or lines or now - beat > PROGRESS_EVERY:
            beat = now
            event = _progress_event(conn, job_id)
            if event != sent:
                ws.send(json.dumps(event))
                sent = event
            # resumed past the closing line: the job's status says it ended
            ended = ended or (not lines and JobStatus(event["status"]).final)
        if ended:
            job = store.get_job(conn, job_id)
            ws.send(json.dumps({"type": "end", "status": job.status,
                                "exit_code": job.exit_code, "error": job.error or None,
                                "result": job.result or None, "last_id": last}))
            return


class StreamSlots:
    """Open streams per job and per token: each holds a server thread, so neither one
    job's watchers nor one token may take them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    @contextlib.contextmanager
    def hold(self, job_id: str, token: str, per_job: int, per_token: int) -> Iterator[bool]:
        who = "token:" + hashlib.sha256(token.encode(errors="replace")).hexdigest()
        keys = ("job:" + job_id, who)
        with self._lock:
            ok = (self._open.get(keys[0], 0) < per_job and self._open.get(keys[1], 0)
                  < per_token)
            if ok:
                for k in keys:
                    self._open[k] = self._open.get(k, 0) + 1
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    for k in keys:
                        self._open[k] -= 1
                        if not self._open[k]:
                            del self._open[k]


SLOTS = StreamSlots()


def register(sock: Sock) -> None:
    @sock.route("/jobs/<job_id>/stream")
    def job_stream(ws: Any, job_id: str) -> None:
        settings = state.settings()
        with SLOTS.hold(job_id, auth.given_token(), settings.max_streams_per_job,
                        settings.max_streams_per_token) as ok:
            if not ok:
                _refuse(ws, "job_id", "too many open streams for this job or token; close "
                                      "some and reconnect")
                return
            follow(ws, job_id, request.args.get("after", "0-0"))
