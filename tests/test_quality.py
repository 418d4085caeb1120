"""The code's own checks: ruff (style, complexity cap) and mypy (types)."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "sheepdog", "web", "tests",
                        "bench"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_mypy_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "mypy", "sheepdog", "web"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]
