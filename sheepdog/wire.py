"""The few Redis commands a short-lived command needs, without redis-py: importing
redis-py costs more than half of `sheepdog run --detach` (about 50 ms here), which a
shell loop submitting jobs pays for every one. One connection, commands packed and
replies read by hiredis (the parser redis-py itself uses when it is installed).

Only plain connections: redis:// (user, password, database) and unix:// sockets.
`open()` gives None for anything else (TLS, options), and the caller uses redis-py.
"""

from __future__ import annotations

import socket
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
        try:
            self._sock.sendall(hiredis.pack_command(args))
            while True:
                reply = self._reader.gets()
                if reply is not False:
                    break
                data = self._sock.recv(65536)
                if not data:
                    raise WireError("Redis closed the connection")
                self._reader.feed(data)
        except OSError as e:
            raise WireError(f"Redis connection lost: {e.strerror or e}") from e
        if isinstance(reply, hiredis.ReplyError):
            raise WireError(str(reply))
        return reply

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
