"""The OpenAPI document served at /openapi.yaml: web/openapi.yaml, plus each
workflow's request schema (JobRequest is one of them) and the backends' names."""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from sheepdog import workflows
from sheepdog.backends import registry

BASE = Path(__file__).parent / "openapi.yaml"


def _schema_name(workflow: str) -> str:
    return "".join(part.capitalize() for part in workflow.split("-")) + "Job"


@cache
def document() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(BASE.read_text())
    schemas = doc["components"]["schemas"]
    common = schemas["JobRequest"]
    refs = []
    for name in workflows.names():
        schema = copy.deepcopy(workflows.get(name).schema())
        schema.setdefault("properties", {}).update(copy.deepcopy(common["properties"]))
        schema["properties"]["workflow"] = {"const": name}
        schemas[_schema_name(name)] = schema
        refs.append({"$ref": f"#/components/schemas/{_schema_name(name)}"})
    common["properties"]["workflow"] = {"enum": list(workflows.names())}
    common["properties"]["backend"] = {"enum": list(registry.names())}
    common["oneOf"] = refs
    return doc


@cache
def document_yaml() -> str:
    return yaml.safe_dump(document(), sort_keys=False)
