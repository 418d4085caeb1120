"""The websocket stream of one job: replay from `after`, then live lines, progress and
status events, and a final `end` event. A client that reconnects with the last line id
it saw misses nothing and gets nothing twice (line ids only grow)."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import request
from flask_sock import Sock

from sheepdog import logs, progress, store
from sheepdog.defaults import PROGRESS_EVERY

from . import state


def _progress_event(conn: Any, job_id: str) -> dict[str, Any]:
    view = progress.job_view(conn, store.get_job(conn, job_id))
    return {"type": "progress", "status": view["status"], "progress": view["progress"],
            "pieces": [{"name": p["name"], "status": p["status"],
                        "attempts": p["attempts"]} for p in view["pieces"]],
            "error": view["error"]}


def follow(ws: Any, job_id: str, after: str) -> None:
    conn = state.conn()
    store.get_job(conn, job_id)  # 404 before anything is sent
    cursors = {job_id: after or "0-0"}
    sent, beat = None, 0.0
    while True:
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
        if ended:
            job = store.get_job(conn, job_id)
            ws.send(json.dumps({"type": "end", "status": job.status,
                                "exit_code": job.exit_code, "error": job.error or None,
                                "result": job.result or None, "last_id": last}))
            return


def register(sock: Sock) -> None:
    @sock.route("/jobs/<job_id>/stream")
    def job_stream(ws: Any, job_id: str) -> None:
        follow(ws, job_id, request.args.get("after", "0-0"))
