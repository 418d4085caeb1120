"""Shared by the web tests: OpenAPI schema checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import yaml

SPEC = yaml.safe_load((Path(__file__).parent.parent / "web" / "openapi.yaml").read_text())


def conforms(instance: Any, schema_name: str) -> None:
    """Validate a response body against a component schema of web/openapi.yaml."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.validate(instance, schema, cls=jsonschema.Draft202012Validator)
