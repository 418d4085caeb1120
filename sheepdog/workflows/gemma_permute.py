"""`gemma-permute`: permutation thresholds for a GEMMA LOCO scan."""

from __future__ import annotations

from ..gemma.scan.plugin import GemmaWorkflow

WORKFLOW = GemmaWorkflow(
    "gemma-permute", "Permutation thresholds (significant 95%, suggestive 67%) for a LOCO scan.",
    permutations=True)
