"""Lua scripts run by their SHA: worked out once per process, the text sent only to a
server that does not know it yet. Works with redis-py (client or pipeline) and with
sheepdog.wire, so a command that submits a job need not import redis-py.

On a redis-py client a call is packed by hiredis and sent on a connection of its pool
(`_send`), not through redis-py's command path: that path encodes each argument in
Python, and a worker's calls carry thirty; it was a sixth of a busy worker's time."""

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
        pool = _pool(client)
        if pool is not None:
            return _raised(_run(pool, [(self, keys, args)])[0])
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except Exception as e:
            if not _no_script(e):
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


def run_many(conn: Any, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]],
             raise_on_error: bool = True) -> list[Any]:
    """Scripts (text, keys, args) in one round trip on a redis-py client, their replies
    in order. Not redis-py's pipeline loading, which asks SCRIPT EXISTS first (a round
    trip more): a server that does not know a script answers NOSCRIPT without running
    it, so that call alone is made again (by its text). `raise_on_error` False: a
    script's error is its reply (the others' replies are not lost with it)."""
    pool = _pool(conn)
    if pool is None:  # not a plain redis-py client: one call at a time
        replies = []
        for text, keys, args in calls:
            try:
                replies.append(script(conn, text)(keys=keys, args=args))
            except Exception as e:
                if raise_on_error or not _is_reply(e):
                    raise
                replies.append(e)
        return replies
    replies = _run(pool, [(_lua(text), keys, args) for text, keys, args in calls])
    if raise_on_error:
        for reply in replies:
            _raised(reply)
    return replies


def _pool(client: Any) -> Any:
    """A plain redis-py client's connection pool (None for a pipeline, sheepdog.wire,
    or anything else: they take their own path)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or getattr(client, "scripts", None) is not None \
            or not hasattr(pool, "get_connection"):
        return None
    return pool


def _run(pool: Any, calls: Sequence[tuple[Lua, Sequence[Any], Sequence[Any]]]) -> list[Any]:
    """EVALSHA of each call in one round trip; one the server did not know is made again
    by its text. Error replies are returned, not raised. A pool may send them its own
    way (`send_together`: a web process's, with other requests' calls, web.green)."""
    send = getattr(pool, "send_together", None) or _send
    replies = send(pool, [("EVALSHA", lua.sha, len(keys), *keys, *args)
                          for lua, keys, args in calls])
    for i, reply in enumerate(replies):
        if isinstance(reply, Exception) and _no_script(reply):
            lua, keys, args = calls[i]
            replies[i] = _send(pool, [("EVAL", lua.script, len(keys), *keys, *args)])[0]
    return replies


def _send(pool: Any, commands: list[tuple[Any, ...]]) -> list[Any]:
    """The commands on one connection of the pool, their replies (an error reply as its
    exception). A failure midway (the connection lost, a timeout) closes the connection:
    replies still due on it would answer the next caller."""
    import hiredis  # redis-py's own parser uses it: imported already where a pool is

    packed = b"".join(map(hiredis.pack_command, commands))
    conn = pool.get_connection()
    try:
        conn.send_packed_command([packed])
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except Exception as e:
                if not _is_reply(e):
                    raise
                replies.append(e)
        return replies
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


@functools.cache
def _reply_error() -> type[Exception]:
    from redis.exceptions import ResponseError

    return ResponseError


def _is_reply(e: BaseException) -> bool:
    """An error the server replied with (the connection is fine), not a lost one."""
    return isinstance(e, _reply_error())


def _no_script(e: BaseException) -> bool:
    """redis-py's NoScriptError, or the reply's own words (sheepdog.wire)."""
    return type(e).__name__ == "NoScriptError" or "NOSCRIPT" in str(e)


def _raised(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply
