"""redis-py in an event-driven web process (gunicorn's gevent worker).

Script calls (a POST /jobs is one) made by the requests that run in one turn of the
event loop go to Redis together, in one write on one connection, their replies read
back together (Together): a round trip each cost the web process a loopback send and
receive and a turn of waiting, and Redis a read and a write per call.

Before each command redis-py asks its pooled connection "is anything left to read?" with
a zero-timeout poll. Under gevent that poll is gevent's: it waits for a whole turn of
the event loop, behind every other request's work, before saying no. Under a burst that
was one of the three turns a POST /jobs waits for. This parser asks the kernel directly
for the zero-timeout case (it never blocks); anything else is gevent's, as before.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

from redis._parsers import _HiredisParser
from redis.exceptions import ConnectionError as RedisConnectionError

from sheepdog import lua


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


Send = Callable[[Any, list[tuple[Any, ...]]], list[Any]]


class Together:
    """A pool's `send_together` (sheepdog.lua): the first caller of a turn of the event
    loop lets the turn finish (every request ready now runs up to its own call), then
    sends all the calls made meanwhile in one round trip and hands each caller its
    replies; the others wait for theirs. Calls made while it waits start the next group.
    A failed round trip fails each of its calls, as it would have failed each alone (a
    sender stopped midway, as at shutdown: a lost connection); a sender stopped before
    sending leaves the others to send theirs themselves."""

    def __init__(self, send: Send | None = None) -> None:
        from gevent.event import AsyncResult

        self._result = AsyncResult
        self._send = send  # None: sheepdog.lua's own, looked up when used
        self._waiting: list[tuple[list[tuple[Any, ...]], Any]] = []

    def __call__(self, pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        while self._waiting:  # a group is forming: join it
            mine = self._result()
            self._waiting.append((commands, mine))
            replies = mine.get()
            if replies is not _AGAIN:
                return replies
        return self._lead(pool, commands)

    def _lead(self, pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
        import gevent

        self._waiting.append((commands, None))
        try:
            gevent.sleep(0)  # the rest of this turn's requests reach their calls
        except BaseException:
            group, self._waiting = self._waiting, []
            for _, other in group[1:]:
                other.set(_AGAIN)  # nothing of theirs was sent
            raise
        group, self._waiting = self._waiting, []
        try:
            replies = (self._send or lua._send)(pool, [c for cmds, _ in group for c in cmds])
        except BaseException as e:
            failed = e if isinstance(e, Exception) else RedisConnectionError(
                f"the round trip that carried this call was stopped ({type(e).__name__})")
            for _, other in group[1:]:
                other.set_exception(failed)
            raise
        at = len(commands)
        for cmds, other in group[1:]:
            other.set(replies[at:at + len(cmds)])
            at += len(cmds)
        return replies[:len(commands)]


_AGAIN = object()  # a follower's answer when its group was never sent


def together(client: Any) -> Any:
    """`client` (redis-py), its script calls sent together when gevent runs this
    process (gunicorn's worker); as it is otherwise."""
    try:
        from gevent import monkey
    except ImportError:
        return client
    if monkey.is_module_patched("select"):
        client.connection_pool.send_together = Together()
    return client
