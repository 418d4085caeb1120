"""`gemma-precompute`: GEMMA LOCO scans of every trait of a dataset, stored and served."""

from __future__ import annotations

from ..gemma.precompute.plugin import PrecomputeWorkflow

WORKFLOW = PrecomputeWorkflow()
