"""Functions the Executor tests send to workers (imported there by module path)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def square(x: int) -> int:
    return x * x


def fail(message: str) -> None:
    raise ValueError(message)


def load_model(marker: str = "") -> dict:
    """A per-worker context: counts how often it is made."""
    path = Path(os.environ.get("SETUP_COUNT_FILE", "/dev/null"))
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    return {"pid": os.getpid(), "weights": [1, 2, 3]}


def score(x: int, context: dict) -> tuple[int, int]:
    return x * sum(context["weights"]), context["pid"]


def slow(seconds: float, marker: str) -> str:
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return "finished"
