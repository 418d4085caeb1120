"""One capped log stream per job; replay and live follow are the same reader."""

from __future__ import annotations

import codecs
import re
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

    def as_dict(self) -> dict[str, object]:
        return {"id": self.id, "task": self.task, "piece": self.piece, "stream": self.stream,
                "text": self.text, "time": self.time, "truncated": self.truncated}


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
    """Appends one task's lines to the logs of every job waiting on it."""

    def __init__(self, conn: redis.Redis, task_id: str, piece: str, job_ids: list[str],
                 max_lines: int) -> None:
        self._conn = conn
        self._task = task_id
        self._piece = piece
        self._jobs = job_ids
        self._cap = max_lines
        self._script = conn.register_script(_APPEND)

    def write(self, stream: str, lines: list[str]) -> None:
        if not lines or not self._jobs:
            return
        now = f"{time.time():.3f}"
        args: list[object] = [self._cap]
        for line in lines:
            args += [self._task, self._piece, stream, line, now]
        for jid in self._jobs:
            self._script(keys=[keys.job_log(jid), keys.job_log_count(jid)], args=args)


def note(conn: redis.Redis, job_id: str, text: str, piece: str = "", task: str = "",
         max_lines: int = 1_000_000) -> None:
    """A line from sheepdog itself (cache hits, retries, lost workers) into a job's log."""
    LogWriter(conn, task, piece, [job_id], max_lines).write("sheepdog", [text])


def _decode(entry_id: bytes | str, fields: dict[bytes, bytes]) -> LogLine:
    f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return LogLine(id=eid, task=f.get("task", ""), piece=f.get("piece", ""),
                   stream=f.get("stream", ""), text=f.get("text", ""),
                   time=float(f.get("time") or 0), truncated=f.get("truncated") == "1")


def read(conn: redis.Redis, job_id: str, after: str = "0-0", count: int = 1000) -> list[LogLine]:
    """Lines strictly after the id `after` (resumable: pass the last id you saw)."""
    start = f"({after}" if after not in ("", "0", "0-0") else "-"
    entries = conn.xrange(keys.job_log(job_id), min=start, max="+", count=count)
    return [_decode(eid, fields) for eid, fields in entries]


def follow(conn: redis.Redis, job_id: str, ended: Callable[[], bool], after: str = "0-0",
           block_ms: int = 500) -> Iterator[LogLine]:
    """Replay from `after`, then follow live until the job has ended and all is read."""
    last = after or "0-0"
    stream = keys.job_log(job_id)
    while True:
        finished = ended()  # read before draining, so no line written before the end is missed
        reply = conn.xread({stream: last}, count=1000, block=None if finished else block_ms)
        lines = [_decode(eid, f) for _, entries in (reply or []) for eid, f in entries]
        yield from lines
        if lines:
            last = lines[-1].id
        elif finished:
            return
