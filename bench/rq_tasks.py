"""What the plain-RQ baselines of map_bench.py run (imported by RQ's workers)."""

from __future__ import annotations

import subprocess


def noop(x: int = 0) -> None:
    return None


def run_true(x: int = 0) -> int:
    return subprocess.run(["true"], check=True).returncode
