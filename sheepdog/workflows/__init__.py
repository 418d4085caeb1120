"""Workflows by name: each is one module of sheepdog.workflows that sets `WORKFLOW`;
its name is the module's with `-` for `_` (gemma_loco.py is `gemma-loco`). Adding a
workflow touches its own module and its tests only: the core names none.

Listing names imports nothing; a workflow's module is imported when first asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from functools import cache
from pathlib import Path

from ..errors import FieldError
from .base import Workflow

_NOT_WORKFLOWS = {"base"}


@cache
def names() -> tuple[str, ...]:
    """Every workflow's name, without importing any."""
    found = [m.name.replace("_", "-") for m in pkgutil.iter_modules([str(Path(__file__).parent)])
             if m.name not in _NOT_WORKFLOWS and not m.name.startswith("_")]
    return tuple(sorted(found))


@cache
def find(name: str) -> Workflow | None:
    """The workflow called `name`, or None (a job of a workflow no longer installed)."""
    if name not in names():
        return None
    module = importlib.import_module(f"{__package__}.{name.replace('-', '_')}")
    workflow: Workflow = module.WORKFLOW
    return workflow


def get(name: object, field: str = "workflow") -> Workflow:
    """The workflow called `name`; FieldError lists the known ones."""
    found = find(name) if isinstance(name, str) else None
    if name is None:
        raise FieldError(field, f"missing; choose one of {', '.join(names())}")
    if found is None:
        raise FieldError(field, f"unknown workflow {str(name)[:80]!r}; choose one of "
                         f"{', '.join(names())}")
    return found
