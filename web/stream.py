"""The websocket stream of one job: replay from `after`, then live lines, progress and
status events, and a final `end` event. A client that reconnects with the last line id
it saw misses nothing and gets nothing twice (line ids only grow)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis
from flask import g, request
from flask_sock import Sock

from sheepdog import keys, logs, progress, store
from sheepdog.defaults import PIECES_PAGE, PROGRESS_EVERY, STREAM_LEASE
from sheepdog.errors import RedisUnavailable, UnknownJob
from sheepdog.lua import script
from sheepdog.models import JobStatus

from . import auth, state

# a job's progress event, shared by every stream of it in this process for this long:
# a thousand watchers of one job cost one computation, not a thousand
PROGRESS_SHARED = 0.5  # s
STREAM_BLOCK_MS = 1000  # a stream's wait for new lines: a closed client is noticed after it
_shared: dict[str, tuple[float, dict[str, Any]]] = {}
_shared_lock = threading.Lock()


def _progress_event(conn: Any, job_id: str, fresh: bool = False) -> dict[str, Any]:
    """The job's progress event, as computed for any stream of it within the last
    PROGRESS_SHARED seconds (`fresh`: computed now)."""
    now = time.monotonic()
    with _shared_lock:
        known = _shared.get(job_id)
        if known is not None and not fresh and now - known[0] < PROGRESS_SHARED:
            return known[1]
        if len(_shared) > 10_000:  # jobs nobody follows any more
            _shared.clear()
    event = _compute_progress(conn, job_id)
    with _shared_lock:
        _shared[job_id] = (now, event)
    return event


def _compute_progress(conn: Any, job_id: str) -> dict[str, Any]:
    """Counts, and each piece only while the whole job fits one page: a job of
    100,000 pieces sends the same few hundred bytes as a LOCO scan."""
    whole = store.count_tasks(conn, job_id) <= PIECES_PAGE
    view = progress.job_view(conn, store.get_job(conn, job_id),
                             limit=PIECES_PAGE if whole else 0)
    return {"type": "progress", "status": view["status"], "progress": view["progress"],
            "pieces": [{"name": p["name"], "status": p["status"],
                        "attempts": p["attempts"]} for p in view["pieces"]],
            "pieces_total": view["pieces_total"], "steps": view.get("steps", []),
            "error": view["error"]}


LOG_ID = re.compile(r"\d{1,20}(-\d{1,20})?")
POLICY_VIOLATION = 1008  # websocket close code: the request itself is wrong
GOING_AWAY_CODE = 1001  # websocket close code: the server is going down
SERVER_ERROR_CODE = 1011  # websocket close code: the server cannot go on (Redis down)
# set when gunicorn is told to stop: every open stream says so and closes, so clients
# reconnect (to this server restarted, or another) and resume from their last id
GOING_AWAY = threading.Event()
REFUSE_LINGER = 0.1  # s between a refusal's error event and its close


def _refuse(ws: Any, field: str, message: str) -> None:
    """A clear error event, then a close that says why (never a traceback)."""
    ws.send(json.dumps({"type": "error", "field": field, "error": message}))
    time.sleep(REFUSE_LINGER)  # let the client read the event before the close arrives
    ws.close(reason=POLICY_VIOLATION, message=message[:120])


class _LockedSocket:
    """A socket whose writes take turns: the websocket library's own thread writes
    pings, pongs and closes on it too, and a batch written in several pieces must not
    have a ping land in its middle (the client sees a broken frame)."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._lock = threading.Lock()

    def send(self, data: bytes) -> int:
        with self._lock:
            self._sock.sendall(data)
            return len(data)

    def sendall(self, data: bytes) -> None:
        with self._lock:
            self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def _serialize_writes(ws: Any) -> None:
    sock = getattr(ws, "sock", None)
    if sock is not None and not isinstance(sock, _LockedSocket):
        ws.sock = _LockedSocket(sock)


def _send_all(ws: Any, messages: list[str]) -> None:
    """Messages in order, as one socket write: a burst of 20,000 lines a second is
    20,000 frames, and a system call each was what made the stream fall behind."""
    frames = getattr(ws, "ws", None)
    sock = getattr(ws, "sock", None)
    if len(messages) < 2 or frames is None or sock is None or not ws.connected:
        for message in messages:
            ws.send(message)
        return
    from wsproto.events import TextMessage

    sock.sendall(b"".join(frames.send(TextMessage(data=m)) for m in messages))


def _going_away(ws: Any, last_id: str) -> None:
    ws.send(json.dumps({"type": "going-away", "last_id": last_id,
                        "error": "the server is going away: reconnect with ?after=last_id"}))
    time.sleep(REFUSE_LINGER)
    ws.close(reason=GOING_AWAY_CODE, message="server going away")


def on_stop_signals() -> None:
    """Under `sheepdog serve`: when gunicorn's worker is told to go (SIGTERM, SIGINT,
    SIGQUIT), tell the open streams first, then let gunicorn's own handler run."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        previous = signal.getsignal(sig)

        def handler(signum: int, frame: Any, previous: Any = previous) -> None:
            GOING_AWAY.set()
            if callable(previous):
                previous(signum, frame)

        signal.signal(sig, handler)


def _may_follow(ws: Any, conn: Any, job_id: str, after: str) -> bool:
    """The job exists and `after` is a log id; else the client is told which is wrong."""
    if not LOG_ID.fullmatch(after):
        _refuse(ws, "after", f"{after[:40]!r} is not a log id (like 1700000000000-0)")
        return False
    try:
        store.get_job(conn, job_id)
    except UnknownJob as e:
        _refuse(ws, "job_id", str(e))
        return False
    return True


def follow(ws: Any, job_id: str, after: str,
           allowed: Callable[[], bool] = lambda: True) -> None:
    """Stream the job to `ws` until it ends, the client goes, the server goes or the
    token that opened it is revoked (`allowed` turns false: asked every round)."""
    conn = state.conn()
    after = after or "0-0"
    if not _may_follow(ws, conn, job_id, after):
        return
    cursors = {job_id: after}
    sent, beat = None, 0.0
    while ws.connected:  # a client that went away frees its thread within one round
        if GOING_AWAY.is_set():
            _going_away(ws, cursors[job_id])
            return
        if not allowed():
            _refuse(ws, "token", "the token that opened this stream was revoked")
            return
        lines = logs.tail(conn, cursors, block_ms=STREAM_BLOCK_MS)
        ended = any(line.end for _, line in lines)
        _send_all(ws, [json.dumps({"type": "line", **line.as_dict()}) for _, line in lines])
        last = cursors[job_id]
        now = time.monotonic()
        if ended or lines or now - beat > PROGRESS_EVERY:
            beat = now
            event = _progress_event(conn, job_id, fresh=ended)
            if event != sent:
                ws.send(json.dumps(event))
                sent = event
            # resumed past the closing line: the job's status says it ended
            ended = ended or (not lines and JobStatus(event["status"]).final)
        if ended:
            _end(ws, conn, job_id, last)
            return


def _end(ws: Any, conn: Any, job_id: str, last: str) -> None:
    job = store.get_job(conn, job_id)
    ws.send(json.dumps({"type": "end", "status": job.status, "exit_code": job.exit_code,
                        "error": job.error or None, "result": job.result or None,
                        "last_id": last}))
    # a client that reads only now must find the events before the close: some clients
    # drop what they buffered once the close frame is in
    time.sleep(REFUSE_LINGER)


# Takes a stream's place (ARGV[3]) in each capped set (KEYS) until ARGV[2] if every one
# has room (its cap: ARGV[4], ARGV[5]...), forgetting places whose lease (the score) ran
# out by ARGV[1], now: a process that died with its streams open frees them within a
# lease. 1 if taken, else 0.
_HOLD = """
local now, expires, member = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then return 0 end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, expires, member)
  redis.call('PEXPIRE', key, math.floor((expires - now) * 2000))
end
return 1
"""


class StreamSlots:
    """Open streams per job and per token, counted in Redis across every web process
    (each stream holds a greenlet and a Redis connection): neither one job's watchers
    nor one token may take them all. A place is leased and renewed while its stream is
    open, so one a killed process held comes free by itself."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[str, ...]] = {}  # stream -> its keys
        self._renewer: threading.Thread | None = None

    @contextlib.contextmanager
    def hold(self, job_id: str, token: str, per_job: int, per_token: int) -> Iterator[bool]:
        who = hashlib.sha256(token.encode(errors="replace")).hexdigest()
        capped = (keys.stream_places("job", job_id), keys.stream_places("token", who))
        member = uuid.uuid4().hex
        conn = state.conn()
        now = time.time()
        ok = bool(script(conn, _HOLD)(keys=list(capped), args=[
            now, now + STREAM_LEASE, member, per_job, per_token]))
        if ok:
            with self._lock:
                self._held[member] = capped
                if self._renewer is None:
                    self._renewer = threading.Thread(target=self._renew, args=(conn,),
                                                     name="stream-places", daemon=True)
                    self._renewer.start()
        try:
            yield ok
        finally:
            if ok:
                with self._lock:
                    self._held.pop(member, None)
                with contextlib.suppress(redis.RedisError):  # its lease runs out instead
                    pipe = conn.pipeline(transaction=False)
                    for key in capped:
                        pipe.zrem(key, member)
                    pipe.execute()

    def _renew(self, conn: redis.Redis) -> None:
        while True:
            time.sleep(STREAM_LEASE / 3)
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            until = time.time() + STREAM_LEASE
            pipe = conn.pipeline(transaction=False)
            for member, capped in held.items():
                for key in capped:
                    pipe.zadd(key, {member: until}, xx=True)
            with contextlib.suppress(redis.RedisError):
                pipe.execute()


SLOTS = StreamSlots()


def own_socket(wsgi: Any) -> Any:
    """WSGI middleware: a websocket gets its own duplicate of gunicorn's socket. The
    websocket library closes its socket when the session ends, while gunicorn still
    holds the same descriptor number for its keep-alive handling; under load that
    number was already another client's connection, whose bytes gunicorn then read
    or whose socket it closed (clients saw broken frames). With a duplicate, each
    closes only its own descriptor."""

    def middleware(environ: dict[str, Any], start_response: Any) -> Any:
        sock = environ.get("gunicorn.socket")
        if (sock is not None and environ.get("HTTP_UPGRADE", "").lower() == "websocket"
                and not isinstance(sock, ssl.SSLSocket)):  # TLS state cannot be duplicated
            environ["gunicorn.socket"] = sock.dup()
        return wsgi(environ, start_response)

    return middleware


def register(sock: Sock) -> None:
    @sock.route("/jobs/<job_id>/stream")
    def job_stream(ws: Any, job_id: str) -> None:
        _serialize_writes(ws)
        settings = state.settings()
        with SLOTS.hold(job_id, auth.given_token(), settings.max_streams_per_job,
                        settings.max_streams_per_token) as ok:
            if not ok:
                _refuse(ws, "job_id", "too many open streams for this job or token; close "
                                      "some and reconnect")
                return
            token = auth.given_token()
            api = g.get("identity") is not None  # (else the job's own read token)
            try:
                follow(ws, job_id, request.args.get("after", "0-0"),
                       lambda: not api or auth.identify(token) is not None)
            except (redis.RedisError, RedisUnavailable) as e:
                # after the handshake an HTTP error page would land inside the websocket
                # as garbage: say it as an event and close, and the client reconnects
                if ws.connected:
                    ws.send(json.dumps({"type": "error", "field": "redis", "error":
                                        f"the job store (Redis) is unreachable: {e}"}))
                    ws.close(reason=SERVER_ERROR_CODE, message="job store unreachable")
