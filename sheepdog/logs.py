"""One capped log stream per job; replay and live follow are the same reader."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import keys
from .defaults import (
    ENDED_CHECK,
    FOLLOW_BLOCK_MS,
    FOLLOW_COUNT,
    FOLLOW_GAP,
    LOG_BATCH_LINES,
    LOG_BUFFER_LINES,
    LOG_FLUSH,
    LOG_FLUSHER_IDLE,
    LOG_MAX_BYTES,
    LOG_SEND_GAP,
)
from .lua import script

STREAMS = ("stdout", "stderr", "sheepdog")

if TYPE_CHECKING:
    import redis


def _redis_error() -> type[Exception]:
    """redis-py's base error, imported when first needed: a command that only submits
    a job imports this module and must not load redis-py (half of such a command's time)."""
    import redis

    return redis.RedisError

# Appends lines to each job's log (KEYS: log, line counter, byte counter, per job; then
# the writer's sequence key) unless that job already offered `cap` lines or `bytecap`
# bytes; the first line over either cap becomes one explicit marker, so a reader knows
# the log was cut and where. One call is atomic over every job; it returns the room left
# in the roomiest log (below 0: every log is past a cap). A batch whose sequence number
# the writer's key already holds was applied (its reply was lost to an outage): it is
# not applied again, and the room it left is returned.
_APPEND = """
local cap, bytecap, seq = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local seqkey = KEYS[#KEYS]
local last = redis.call('GET', seqkey)
if last then
  local colon = string.find(last, ':')
  if tonumber(string.sub(last, 1, colon - 1)) >= seq then
    return tonumber(string.sub(last, colon + 1))
  end
end
local room = -1
for k = 1, #KEYS - 1, 3 do
  local n, b = 0, 0
  for i = 4, #ARGV, 5 do
    n = redis.call('INCR', KEYS[k + 1])
    local before = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
    if before <= bytecap then
      b = redis.call('INCRBY', KEYS[k + 2], #ARGV[i+3])
    else
      b = before
    end
    if n <= cap and b <= bytecap then
      redis.call('XADD', KEYS[k], '*', 'task', ARGV[i], 'piece', ARGV[i+1],
                 'stream', ARGV[i+2], 'text', ARGV[i+3], 'time', ARGV[i+4])
    elseif n <= cap + 1 and before <= bytecap then
      redis.call('XADD', KEYS[k], '*', 'task', ARGV[i], 'piece', ARGV[i+1],
                 'stream', 'sheepdog', 'truncated', '1', 'time', ARGV[i+4],
                 'text', 'log truncated: more than ' .. cap .. ' lines or ' .. bytecap ..
                 ' bytes; later lines are not kept')
    end
  end
  room = math.max(room, math.min(cap - n, bytecap - b))
end
redis.call('SET', seqkey, seq .. ':' .. room, 'EX', 86400)
return room
"""
_FIELDS = 5  # task, piece, stream, text, time: one line's arguments


@dataclass(frozen=True)
class LogLine:
    """One line of a job's log, as every reader (CLI, websocket, page) sees it."""

    id: str
    task: str
    piece: str
    stream: str
    text: str
    time: float
    truncated: bool = False
    end: bool = False  # the job's last line: written with the status change that ends it

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "task": self.task, "piece": self.piece, "stream": self.stream,
                "text": self.text, "time": self.time, "truncated": self.truncated,
                "end": self.end}


def note_fields(text: str, task: str = "", piece: str = "") -> dict[str, str]:
    """A sheepdog line written inside a store transaction (it bypasses the cap)."""
    return {"task": task, "piece": piece, "stream": "sheepdog", "text": text,
            "time": f"{time.time():.3f}"}


def end_fields(status: str, exit_code: int | None, error: str = "", job_id: str = ""
               ) -> dict[str, str]:
    """The closing line of a job's log; store.py adds it in the transaction that ends it.
    It names the job: what `status`, `logs` and `result` take."""
    text = (f"job {job_id} {status}" if job_id else f"job {status}") + (
        f" (exit code {exit_code})" if exit_code is not None else "")
    if error:
        text += f": {error}"
    return {"task": "", "piece": "", "stream": "sheepdog", "text": text,
            "time": f"{time.time():.3f}", "end": "1"}


class LogWriter:
    """Appends one task's lines to the logs of every job waiting on it.

    A line goes out at once when the last batch left LOG_SEND_GAP (20 ms) ago; lines
    that come sooner go together at the end of that gap. A quiet program's lines reach
    readers in one round trip, a chatty one's cost at most 50 round trips a second,
    not one per line. Batches go in order, each at most LOG_BATCH_LINES lines. While
    Redis cannot be reached, lines wait (up to `buffer_lines` of them) and are sent
    when it is back; past that, `lost` says why the log is not whole, and the piece is
    failed or run again for it.
    """

    def __init__(self, conn: redis.Redis, task_id: str, piece: str, job_ids: list[str],
                 max_lines: int, flush_every: float = LOG_FLUSH,
                 buffer_lines: int = LOG_BUFFER_LINES, max_bytes: int = LOG_MAX_BYTES) -> None:
        self._conn = conn
        self._task = task_id
        self._piece = piece
        self._jobs = job_ids
        self._keys = [k for jid in job_ids for k in (keys.job_log(jid), keys.job_log_count(jid),
                                                     keys.job_log_bytes(jid))]
        self._cap = max_lines
        self._bytecap = max_bytes
        self._script = script(conn, _APPEND)
        self._seqkey = ""  # named with the first batch: most tiny pieces print nothing
        self._seq = 0
        self._again: tuple[int, int] | None = None  # (seq, fields) of a batch of unknown fate
        self._every = flush_every
        self._buffer = buffer_lines
        self._pending: list[object] = []
        self._lock = threading.Lock()  # guards _pending
        self._sending = threading.Lock()  # one batch on the wire at a time: order kept
        self._last = time.monotonic()
        self._failed = False  # the last send met a Redis error
        self._due = threading.Event()  # lines wait for the flusher thread
        self._flusher: threading.Thread | None = None
        self.lost = ""
        self.capped = False  # every log is past its cap: lines cost no round trip any more

    def write(self, stream: str, lines: list[str]) -> None:
        """Buffer the lines; send at once if the last batch left LOG_SEND_GAP ago and
        none is on the wire, else within that gap (one batch for all that came)."""
        if not lines or not self._jobs or self.lost or self.capped:
            return
        now = f"{time.time():.3f}"
        with self._lock:
            for line in lines:
                self._pending += [self._task, self._piece, stream, line, now]
        if self._failed and time.monotonic() - self._last < self._every:
            return  # Redis just refused: the lines wait for the next flush, not a storm
        if time.monotonic() - self._last >= LOG_SEND_GAP and self._sending.acquire(False):
            try:
                self._send()
            finally:
                self._sending.release()
            with self._lock:
                if not self._pending:
                    return
        self._later()

    def add(self, stream: str, lines: list[str]) -> None:
        """Buffer lines to send at the next flush (a batch that came whole: a pull
        worker's, written by the service in one call)."""
        if not lines or not self._jobs or self.lost or self.capped:
            return
        now = f"{time.time():.3f}"
        with self._lock:
            for line in lines:
                self._pending += [self._task, self._piece, stream, line, now]

    def _later(self) -> None:
        """Have the pending lines sent LOG_SEND_GAP after the last batch, by a thread that
        lives while lines keep coming (and goes after a quiet second)."""
        with self._lock:
            self._due.set()
            if self._flusher is None or not self._flusher.is_alive():
                self._flusher = threading.Thread(target=self._flush_later, daemon=True,
                                                 name=f"log-{self._task[:8]}")
                self._flusher.start()

    def _flush_later(self) -> None:
        while self._due.wait(LOG_FLUSHER_IDLE):
            self._due.clear()
            time.sleep(max(0.0, self._last + LOG_SEND_GAP - time.monotonic()))
            with self._sending:
                if self._failed and time.monotonic() - self._last < self._every:
                    continue  # the next flush() sends them
                self._send()

    def flush(self, strict: bool = False) -> None:
        """Send what is buffered. A Redis error keeps the lines for the next flush;
        `strict` raises it instead of waiting for better times."""
        with self._sending:
            self._send(strict)

    def _send(self, strict: bool = False) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._last = time.monotonic()
        sent = 0
        step = LOG_BATCH_LINES * _FIELDS
        try:
            while sent < len(batch) and not self.capped:
                # a batch whose reply was lost goes again as it was, under its number
                if self._again is None:
                    self._seq += 1
                    self._again = (self._seq, min(step, len(batch) - sent))
                seq, size = self._again
                self._seqkey = self._seqkey or keys.log_writer(uuid.uuid4().hex)
                room = self._script(keys=[*self._keys, self._seqkey], args=[
                    self._cap, self._bytecap, seq, *batch[sent:sent + size]])
                self._again = None
                sent += size
                self.capped = int(room) < 0
            self._failed = False
        except _redis_error() as e:
            self._failed = True
            self._keep(batch[sent:], e)
            if strict:
                raise

    def done(self) -> None:
        """The piece ended and its lines are sent: its sequence key goes (else a day)."""
        if self._seq and self._again is None and not self._pending:
            try:
                self._conn.delete(self._seqkey)
            except _redis_error():
                pass  # it expires by itself

    def _keep(self, unsent: list[object], error: redis.RedisError) -> None:
        with self._lock:
            self._pending = unsent + self._pending
            if len(self._pending) > self._buffer * _FIELDS and not self.lost:
                self.lost = (f"its output could not be recorded: {len(self._pending) // _FIELDS}"
                             f" lines waited for Redis ({type(error).__name__}: {error})")
                self._pending = []
                self._again = None


class RawWriter:
    """The exact bytes a capturing piece writes (GN3 wants its commands' stdout as is),
    appended to keys.task_raw; kept while Redis is unreachable, like LogWriter's lines."""

    def __init__(self, conn: redis.Redis, task_id: str) -> None:
        self._conn = conn
        self._task = task_id
        self._pending: dict[str, bytearray] = {}
        self._lock = threading.Lock()
        self._sending = threading.Lock()

    def reset(self) -> None:
        """A new attempt starts from nothing."""
        self._conn.delete(keys.task_raw(self._task, "stdout"), keys.task_raw(self._task, "stderr"))

    def append(self, stream: str, chunk: bytes) -> None:
        with self._lock:
            self._pending.setdefault(stream, bytearray()).extend(chunk)

    def flush(self, strict: bool = False) -> None:
        with self._sending:
            with self._lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return
            pipe = self._conn.pipeline(transaction=True)  # both streams or neither
            for stream, data in batch.items():
                pipe.append(keys.task_raw(self._task, stream), bytes(data))
            try:
                pipe.execute()
            except _redis_error():
                with self._lock:
                    for stream, data in batch.items():
                        self._pending[stream] = data + self._pending.get(stream, bytearray())
                if strict:
                    raise


def raw_output(conn: redis.Redis, task_id: str, stream: str) -> bytes:
    """What a capturing task wrote to a stream, byte for byte (b'' if nothing)."""
    value = conn.get(keys.task_raw(task_id, stream))
    return bytes(value) if value else b""


def note(conn: redis.Redis, job_id: str, text: str, piece: str = "", task: str = "",
         max_lines: int = 1_000_000) -> None:
    """A line from sheepdog itself (cache hits, retries, lost workers) into a job's log."""
    writer = LogWriter(conn, task, piece, [job_id], max_lines)
    writer.write("sheepdog", [text])
    writer.flush(strict=True)


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> LogLine:
    f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return LogLine(id=eid, task=f.get("task", ""), piece=f.get("piece", ""),
                   stream=f.get("stream", ""), text=f.get("text", ""),
                   time=float(f.get("time") or 0), truncated=f.get("truncated") == "1",
                   end=f.get("end") == "1")


def last(conn: redis.Redis, job_id: str, count: int = 200) -> list[LogLine]:
    """A job's last `count` log lines, in order (a page drawn before its script runs)."""
    entries = conn.xrevrange(keys.job_log(job_id), count=count)
    return [decode(entry_id, fields) for entry_id, fields in reversed(entries)]


def read(conn: redis.Redis, job_id: str, after: str = "0-0", count: int = 1000) -> list[LogLine]:
    """Lines strictly after the id `after` (resumable: pass the last id you saw)."""
    start = f"({after}" if after not in ("", "0", "0-0") else "-"
    entries = conn.xrange(keys.job_log(job_id), min=start, max="+", count=count)
    return [decode(eid, fields) for eid, fields in entries]


def tail(conn: redis.Redis, cursors: dict[str, str], block_ms: int | None = FOLLOW_BLOCK_MS,
         count: int = FOLLOW_COUNT) -> list[tuple[str, LogLine]]:
    """The one log follower: new lines of several jobs' logs after their cursors, as
    (job id, line); blocks up to block_ms when nothing is new (None: not at all).

    Advances `cursors` (job id -> last line id seen) past what it returns.
    """
    streams = {keys.job_log(jid): after or "0-0" for jid, after in cursors.items()}
    job_of = {keys.job_log(jid): jid for jid in cursors}
    reply = conn.xread(streams, count=count, block=block_ms)
    got: list[tuple[str, LogLine]] = []
    for stream, entries in reply or []:
        jid = job_of[stream.decode() if isinstance(stream, bytes) else stream]
        for entry_id, fields in entries:
            line = decode(entry_id, fields)
            got.append((jid, line))
            cursors[jid] = line.id
    return got


def follow(conn: redis.Redis, job_id: str, ended: Callable[[], bool], after: str = "0-0",
           block_ms: int = FOLLOW_BLOCK_MS) -> Iterator[LogLine]:
    """Replay from `after`, then follow live until the job's closing line.

    `ended` is asked when the stream is idle (and at least once a second): it may start
    a worker, and it covers a job that ended without a closing line.
    """
    cursors = {job_id: after or "0-0"}
    asked = -10.0
    while True:
        now = time.monotonic()
        finished = False
        if now - asked > ENDED_CHECK:
            finished, asked = ended(), now
        lines = tail(conn, cursors, block_ms=None if finished else block_ms)
        for _, line in lines:
            yield line
            if line.end:
                return
        if lines and len(lines) < FOLLOW_COUNT and not finished:
            # lines that keep coming are read in batches, FOLLOW_GAP apart, not one
            # round trip each (a busy job's notes cost its follower a core's tenth)
            time.sleep(FOLLOW_GAP)
        if not lines and (finished or ended()):
            asked = time.monotonic()
            if finished:
                return
