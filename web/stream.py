"""The websocket stream of one job: replay from `after`, then live lines, progress and
status events, and a final `end` event. A client that reconnects with the last line id
it saw misses nothing and gets nothing twice (line ids only grow)."""

from __future__ import annotations

import json
import time
from typing import Any

from flask import request
from flask_sock import Sock

from sheepdog import keys, progress, store
from sheepdog.logs import decode

from . import state

POLL_MS = 300


def _progress_event(conn: Any, job_id: str) -> dict[str, Any]:
    view = progress.job_view(conn, store.get_job(conn, job_id))
    return {"type": "progress", "status": view["status"], "progress": view["progress"],
            "pieces": [{"name": p["name"], "status": p["status"],
                        "attempts": p["attempts"]} for p in view["pieces"]],
            "error": view["error"]}


def follow(ws: Any, job_id: str, after: str) -> None:
    conn = state.conn()
    store.get_job(conn, job_id)  # 404 before anything is sent
    stream = keys.job_log(job_id)
    last, sent, beat = after or "0-0", None, 0.0
    while True:
        reply = conn.xread({stream: last}, count=500, block=POLL_MS)
        ended = False
        for _, entries in reply or []:
            for entry_id, fields in entries:
                line = decode(entry_id, fields)
                ws.send(json.dumps({"type": "line", **line.as_dict()}))
                last = line.id
                ended = ended or line.end
        now = time.monotonic()
        if ended or reply or now - beat > 1.0:
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
