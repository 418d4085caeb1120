"""redis-py in an event-driven web process (gunicorn's gevent worker).

Before each command redis-py asks its pooled connection "is anything left to read?" with
a zero-timeout poll. Under gevent that poll is gevent's: it waits for a whole turn of
the event loop, behind every other request's work, before saying no. Under a burst that
was one of the three turns a POST /jobs waits for. This parser asks the kernel directly
for the zero-timeout case (it never blocks); anything else is gevent's, as before.
"""

from __future__ import annotations

import select
from typing import Any

from redis._parsers import _HiredisParser


def _unpatched_poll() -> Any:
    try:
        from gevent import monkey
    except ImportError:  # no gevent: select.poll is the kernel's already
        return select.poll
    return monkey.get_original("select", "poll")


_POLL = _unpatched_poll()


class Parser(_HiredisParser):
    """hiredis's parser, whose `can_read(0)` does not yield to the event loop."""

    def can_read(self, timeout: float = 0) -> bool:
        sock, reader = self._sock, self._reader
        if (timeout == 0 and sock is not None and reader is not None and not reader.has_data()
                and not (hasattr(sock, "pending") and sock.pending())):  # TLS's own buffer
            poller = _POLL()
            poller.register(sock.fileno(), select.POLLIN)
            if not poller.poll(0):
                return False
        # something to read (or a closed socket, or a wait): redis-py's own check
        return bool(super().can_read(timeout))


def options() -> dict[str, Any]:
    """redis-py connection options for a web process: this parser when gevent has
    patched `select` (gunicorn's worker), nothing otherwise."""
    try:
        from gevent import monkey
    except ImportError:
        return {}
    return {"parser_class": Parser} if monkey.is_module_patched("select") else {}
