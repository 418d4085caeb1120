"""One capped log stream per job; replay and live follow are the same reader."""

from __future__ import annotations

import codecs
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from . import keys

STREAMS = ("stdout", "stderr", "sheepdog")

# Appends lines unless the job already offered `cap` of them; the first line over the
# cap becomes one explicit marker, so a reader knows the log was cut and where.
_APPEND = """
local cap = tonumber(ARGV[1])
local added = 0
for i = 2, #ARGV, 5 do
  local n = redis.call('INCR', KEYS[2])
  if n <= cap then
    redis.call('XADD', KEYS[1], '*', 'task', ARGV[i], 'piece', ARGV[i+1],
               'stream', ARGV[i+2], 'text', ARGV[i+3], 'time', ARGV[i+4])
    added = added + 1
  elseif n == cap + 1 then
    redis.call('XADD', KEYS[1], '*', 'task', ARGV[i], 'piece', ARGV[i+1],
               'stream', 'sheepdog', 'truncated', '1', 'time', ARGV[i+4],
               'text', 'log truncated: more than ' .. cap .. ' lines; later lines are not kept')
  end
end
return added
"""


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


def end_fields(status: str, exit_code: int | None, error: str = "") -> dict[str, str]:
    """The closing line of a job's log; store.py adds it in the transaction that ends it."""
    text = f"job {status}" + (f" (exit code {exit_code})" if exit_code is not None else "")
    if error:
        text += f": {error}"
    return {"task": "", "piece": "", "stream": "sheepdog", "text": text,
            "time": f"{time.time():.3f}", "end": "1"}


class LineSplitter:
    """Turns raw output chunks into lines; a `\\r` redraw (a progress bar) ends a line too."""

    _BREAK = re.compile(r"\r\n|\n|\r")

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._partial = ""
        self._last = ""

    def feed(self, chunk: bytes) -> list[str]:
        text = self._partial + self._decoder.decode(chunk)
        parts = self._BREAK.split(text)
        self._partial = parts.pop()
        # a lone trailing \r may be the first half of \r\n: keep it for the next chunk
        if text.endswith("\r"):
            self._partial = parts.pop() + "\r" if parts else "\r"
        return self._keep(parts)

    def flush(self) -> list[str]:
        rest = (self._partial + self._decoder.decode(b"", final=True)).rstrip("\r")
        self._partial = ""
        return self._keep([rest])

    def _keep(self, parts: list[str]) -> list[str]:
        out = []
        for part in parts:
            line = part.rstrip()
            # redraws repeat the same bar: one copy is enough
            if line.strip() and line != self._last:
                out.append(line)
                self._last = line
        return out


class LogWriter:
    """Appends one task's lines to the logs of every job waiting on it.

    Lines are buffered and sent at most every `flush_every` seconds (and on flush()), so
    a chatty program costs a few round trips a second, not one per line.
    """

    def __init__(self, conn: redis.Redis, task_id: str, piece: str, job_ids: list[str],
                 max_lines: int, flush_every: float = 0.2) -> None:
        self._conn = conn
        self._task = task_id
        self._piece = piece
        self._jobs = job_ids
        self._cap = max_lines
        self._script = conn.register_script(_APPEND)
        self._every = flush_every
        self._pending: list[object] = []
        self._lock = threading.Lock()
        self._last = time.monotonic()

    def write(self, stream: str, lines: list[str]) -> None:
        if not lines or not self._jobs:
            return
        now = f"{time.time():.3f}"
        with self._lock:
            for line in lines:
                self._pending += [self._task, self._piece, stream, line, now]
        if time.monotonic() - self._last >= self._every:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
            self._last = time.monotonic()
        if not batch:
            return
        for jid in self._jobs:
            self._script(keys=[keys.job_log(jid), keys.job_log_count(jid)],
                         args=[self._cap, *batch])


def note(conn: redis.Redis, job_id: str, text: str, piece: str = "", task: str = "",
         max_lines: int = 1_000_000) -> None:
    """A line from sheepdog itself (cache hits, retries, lost workers) into a job's log."""
    writer = LogWriter(conn, task, piece, [job_id], max_lines)
    writer.write("sheepdog", [text])
    writer.flush()


def decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> LogLine:
    f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return LogLine(id=eid, task=f.get("task", ""), piece=f.get("piece", ""),
                   stream=f.get("stream", ""), text=f.get("text", ""),
                   time=float(f.get("time") or 0), truncated=f.get("truncated") == "1",
                   end=f.get("end") == "1")


def read(conn: redis.Redis, job_id: str, after: str = "0-0", count: int = 1000) -> list[LogLine]:
    """Lines strictly after the id `after` (resumable: pass the last id you saw)."""
    start = f"({after}" if after not in ("", "0", "0-0") else "-"
    entries = conn.xrange(keys.job_log(job_id), min=start, max="+", count=count)
    return [decode(eid, fields) for eid, fields in entries]


def follow(conn: redis.Redis, job_id: str, ended: Callable[[], bool], after: str = "0-0",
           block_ms: int = 250) -> Iterator[LogLine]:
    """Replay from `after`, then follow live until the job's closing line.

    `ended` is asked when the stream is idle (and at least once a second): it may start
    a worker, and it covers a job that ended without a closing line.
    """
    last = after or "0-0"
    stream = keys.job_log(job_id)
    asked = -10.0
    while True:
        now = time.monotonic()
        finished = False
        if now - asked > 1.0:
            finished, asked = ended(), now
        reply = conn.xread({stream: last}, count=1000, block=None if finished else block_ms)
        lines = [decode(eid, f) for _, entries in (reply or []) for eid, f in entries]
        for line in lines:
            yield line
            if line.end:
                return
        if lines:
            last = lines[-1].id
        elif finished or ended():
            asked = time.monotonic()
            if finished:
                return
