"""What the plain-RQ baselines of map_bench.py run (imported by RQ's workers)."""

from __future__ import annotations

import subprocess
import time


def noop(x: int = 0) -> None:
    return None


def run_true(x: int = 0) -> int:
    return subprocess.run(["true"], check=True).returncode


def sleep10(x: int = 0) -> None:
    """A call that waits 10 ms (peers_bench.py)."""
    time.sleep(0.01)
