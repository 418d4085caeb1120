"""Is the process that ran an attempt still there? Known at once on the same host.

A process is named "host pid start-time": the start time (from /proc) tells a live
process from a new one that got the same pid after the first one died.
"""

from __future__ import annotations

import os
import socket
from functools import cache


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name ([] where /proc has none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces: count fields after its ')'
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc has none)."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else ""


@cache
def this_process() -> str:
    """This process's name for other processes to check."""
    pid = os.getpid()
    return f"{socket.gethostname()} {pid} {_start_time(pid)}"


def alive_here(process: str) -> bool:
    """True only when the named process ran on this host and is running still."""
    parts = process.split()
    return len(parts) == 3 and parts[0] == socket.gethostname() and not gone(process)


def gone(process: str) -> bool:
    """True only when the named process is known to be dead: it ran on this host and
    its pid is free or belongs to a later process. Another host's: never known here."""
    parts = process.split()
    if len(parts) != 3 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, someone else's
    fields = _stat(pid)
    if fields[:1] == ["Z"]:
        return True  # exited: only its zombie waits for its parent to reap it
    started = fields[19] if len(fields) > 19 else ""
    return bool(started and parts[2] and started != parts[2])
