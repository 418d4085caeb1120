"""`gemma`: a GEMMA genome scan against one kinship of all SNPs (no LOCO), as GEMMA's
`-gk` then `-lmm` gives it, split per chromosome, cached, merged."""

from __future__ import annotations

from ..gemma.scan.plugin import GemmaWorkflow

WORKFLOW = GemmaWorkflow(
    "gemma", "A GEMMA genome scan against the kinship of all SNPs (no LOCO), split per "
    "chromosome, cached, merged into --out.", permutations=False, loco=False)
