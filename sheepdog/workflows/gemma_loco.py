"""`gemma-loco`: a GEMMA LOCO genome scan, split per chromosome, cached, merged."""

from __future__ import annotations

from ..gemma.scan.plugin import GemmaWorkflow

WORKFLOW = GemmaWorkflow(
    "gemma-loco", "A GEMMA LOCO genome scan, split per chromosome, cached, merged into --out.",
    permutations=False)
