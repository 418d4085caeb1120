"""Lua scripts run by their SHA: worked out once per process, the text sent only to a
server that does not know it yet. Works with redis-py (client or pipeline) and with
sheepdog.wire, so a command that submits a job need not import redis-py."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import Any


class Lua:
    """One script. The attributes `sha` and `script` are what a redis-py pipeline loads
    before it runs the scripts queued in it."""

    def __init__(self, text: str) -> None:
        self.script = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = (),
                 client: Any = None) -> Any:
        scripts = getattr(client, "scripts", None)
        if isinstance(scripts, set):  # a redis-py pipeline: it loads them at execute
            scripts.add(self)
            return client.evalsha(self.sha, len(keys), *keys, *args)
        if _size(args) > LARGE and hasattr(client, "script_exists"):
            # a big call (a whole job's pieces) is not sent twice to a server that does
            # not know its script yet: it is asked first, a small round trip
            if not client.script_exists(self.sha)[0]:
                client.script_load(self.script)
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except Exception as e:  # redis-py's NoScriptError, or the reply's own words
            if type(e).__name__ != "NoScriptError" and "NOSCRIPT" not in str(e):
                raise
            return client.eval(self.script, len(keys), *keys, *args)


LARGE = 1 << 16  # bytes of arguments worth asking whether the server knows the script


def _size(args: Sequence[Any]) -> int:
    return sum(len(a) for a in args if isinstance(a, str | bytes))


@functools.cache
def _lua(text: str) -> Lua:
    return Lua(text)


def script(conn: Any, text: str) -> Callable[..., Any]:
    """The script, to be called as redis-py's register_script gives it (keys=, args=;
    client= another connection or a pipeline), on `conn`."""
    return functools.partial(_lua(text), client=conn)


def run_many(conn: Any, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]]
             ) -> list[Any]:
    """Scripts (text, keys, args) in one round trip on a redis-py client, their replies
    in order. Not redis-py's pipeline loading, which asks SCRIPT EXISTS first (a round
    trip more): a server that does not know a script answers NOSCRIPT without running
    it, so that call alone is made again (by its text, when needed)."""
    if len(calls) == 1:
        text, keys, args = calls[0]
        return [script(conn, text)(keys=keys, args=args)]
    pipe = conn.pipeline(transaction=False)
    for text, keys, args in calls:
        pipe.evalsha(_lua(text).sha, len(keys), *keys, *args)
    replies = pipe.execute(raise_on_error=False)
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception):
            if type(reply).__name__ != "NoScriptError" and "NOSCRIPT" not in str(reply):
                raise reply
            text, keys, args = calls[i]
            replies[i] = script(conn, text)(keys=keys, args=args)
    return replies
