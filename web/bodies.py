"""Request bodies read within a limit: a JSON body is read in pieces and refused (413)
the moment it passes its limit, whether it came with a Content-Length or chunked, so
no client can make the service hold more than the limit in memory."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from sheepdog.errors import FieldError

PIECE = 64 << 10  # bytes read at a time


def read(limit: int, field: str = "body") -> bytes:
    """The whole body, at most `limit` bytes; FieldError 413 past it."""
    too_big = FieldError(field, f"over {limit:,d} bytes", 413)
    if (request.content_length or 0) > limit:
        raise too_big
    got = bytearray()
    stream = request.stream
    while True:
        piece = stream.read(min(PIECE, limit + 1 - len(got)))
        if not piece:
            return bytes(got)
        got += piece
        if len(got) > limit:
            raise too_big


def read_json(limit: int, field: str = "body") -> Any:
    """The body as JSON (within `limit`); FieldError 400 says what is wrong with it."""
    raw = read(limit, field)
    try:
        return json.loads(raw or b"null")
    except json.JSONDecodeError as e:
        raise FieldError(field, f"malformed JSON: {e.msg} at line {e.lineno} column "
                         f"{e.colno}") from None
    except (ValueError, RecursionError) as e:  # a 5,000-digit number, nesting 100,000 deep
        raise FieldError(field, f"unusable JSON: {str(e)[:120] or type(e).__name__}") from None
