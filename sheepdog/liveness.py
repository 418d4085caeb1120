"""Is the process that ran an attempt still there? Known at once on the same host.

A process is named "host pid start-time": the start time (from /proc) tells a live
process from a new one that got the same pid after the first one died.
"""

from __future__ import annotations

import os
import socket
from functools import cache


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot ('' where /proc has none)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # the command name (field 2) may hold spaces: count fields after its ')'
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


@cache
def this_process() -> str:
    """This process's name for other processes to check."""
    pid = os.getpid()
    return f"{socket.gethostname()} {pid} {_start_time(pid)}"


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
    started = _start_time(pid)
    return bool(started and parts[2] and started != parts[2])
