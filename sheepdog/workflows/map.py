"""`map`: a command once per item, as a durable, distributed GNU parallel."""

from __future__ import annotations

from ..mapping.plugin import MapWorkflow

WORKFLOW = MapWorkflow()
