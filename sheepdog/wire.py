"""The few Redis commands a short-lived command needs, without redis-py: importing
redis-py costs more than half of `sheepdog run --detach` (about 50 ms here), which a
shell loop submitting jobs pays for every one. One connection, commands packed and
replies read by hiredis (the parser redis-py itself uses when it is installed).

Only plain connections: redis:// (user, password, database) and unix:// sockets.
`open()` gives None for anything else (TLS, options), and the caller uses redis-py.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from .errors import SheepdogError

_TIMEOUT = 30.0  # s: a reply that takes longer means Redis is gone


def _place(url: str) -> tuple[socket.AddressFamily, Any, str] | None:
    """(address family, address, database) of a URL this client does; None otherwise."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    place: tuple[socket.AddressFamily, Any, str]
    if parts.scheme == "unix" and set(query) <= {"db"}:
        place = (socket.AF_UNIX, parts.path, query.get("db", "0"))
    elif parts.scheme == "redis" and not query and parts.hostname:
        family = socket.AF_INET6 if ":" in parts.hostname else socket.AF_INET
        place = (family, (parts.hostname, parts.port or 6379), parts.path.strip("/") or "0")
    else:
        return None
    return place if place[2].isdigit() else None


class WireError(SheepdogError):
    """Redis answered with an error, or could not be reached."""


class Wire:
    """One connection; the method names and replies are redis-py's for the commands it
    has, so code written for a redis-py client runs on it (sheepdog.lua, registration)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._reader = hiredis.Reader()

    @classmethod
    def open(cls, url: str) -> Wire | None:
        """A connection to `url`; None if this client does not do such a URL. WireError
        if the server cannot be reached or refuses the password."""
        place = _place(url)
        if place is None:
            return None
        family, address, db = place
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(_TIMEOUT)
            sock.connect(address)
        except OSError as e:
            raise WireError(f"cannot reach Redis: {e.strerror or e}") from e
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        wire = cls(sock)
        parts = urlsplit(url)
        if parts.password is not None:
            auth = ([unquote(parts.username)] if parts.username else []) + [
                unquote(parts.password)]
            wire.call("AUTH", *auth)
        if db != "0":
            wire.call("SELECT", db)
        return wire

    def call(self, *args: Any) -> Any:
        """Send one command, return its reply; WireError for an error reply."""
        return self.call_many([args])[0]

    def call_many(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands in one write, return their replies in order; WireError for
        the first error reply (as a redis-py pipeline raises)."""
        replies: list[Any] = []
        try:
            self._sock.sendall(b"".join(hiredis.pack_command(c) for c in commands))
            while len(replies) < len(commands):
                reply = self._reader.gets()
                if reply is not False:
                    replies.append(reply)
                    continue
                data = self._sock.recv(65536)
                if not data:
                    raise WireError("Redis closed the connection")
                self._reader.feed(data)
        except OSError as e:
            raise WireError(f"Redis connection lost: {e.strerror or e}") from e
        for reply in replies:
            if isinstance(reply, hiredis.ReplyError):
                raise WireError(str(reply))
        return replies

    def close(self) -> None:
        self._sock.close()

    # -- as redis-py names them
    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.call("EVALSHA", sha, numkeys, *keys_and_args)

    def eval(self, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.call("EVAL", script, numkeys, *keys_and_args)

    def smembers(self, key: str) -> set[bytes]:
        return set(self.call("SMEMBERS", key))

    def mget(self, keys: list[str]) -> list[bytes | None]:
        return list(self.call("MGET", *keys))

    def srem(self, key: str, *members: Any) -> int:
        return int(self.call("SREM", key, *members))

    def scard(self, key: str) -> int:
        return int(self.call("SCARD", key))

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return _pairs(self.call("HGETALL", key))

    def llen(self, key: str) -> int:
        return int(self.call("LLEN", key))

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return list(self.call("LRANGE", key, start, end))

    def zrevrange(self, key: str, start: int, end: int) -> list[bytes]:
        return list(self.call("ZREVRANGE", key, start, end))

    def xrange(self, key: str, min: str = "-", max: str = "+",  # noqa: A002  redis-py's
               count: int | None = None) -> list[tuple[bytes, dict[bytes, bytes]]]:
        more = ["COUNT", count] if count is not None else []
        return [(entry, _pairs(fields))
                for entry, fields in self.call("XRANGE", key, min, max, *more)]

    def pipeline(self, transaction: bool = True) -> Batch:
        """Reads sent together (redis-py's pipeline without a transaction)."""
        if transaction:
            raise TypeError("Wire has no transactions: use pipeline(transaction=False)")
        return Batch(self)


def _pairs(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Batch:
    """Commands recorded and sent in one write by execute(), replies as redis-py gives
    them (only the reads a short command makes)."""

    def __init__(self, wire: Wire) -> None:
        self._wire = wire
        self._commands: list[tuple[tuple[Any, ...], Callable[[Any], Any]]] = []

    def hgetall(self, key: str) -> Batch:
        self._commands.append((("HGETALL", key), _pairs))
        return self

    def execute(self) -> list[Any]:
        commands, self._commands = self._commands, []
        if not commands:
            return []
        replies = self._wire.call_many([command for command, _ in commands])
        return [shape(reply) for (_, shape), reply in zip(commands, replies, strict=True)]
