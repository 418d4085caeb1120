"""API tokens with roles, stored hashed in a file beside the config.

A token is shown once, when made; the file keeps only its sha256 (tokens are 256
random bits, so a plain hash cannot be searched back). The service reads the file
again whenever it changes: a revoked token stops working at its next request, with
no restart. Tokens given in SHEEPDOG_API_TOKENS keep every role, as before roles.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Settings, config_file
from .errors import ConfigError

log = logging.getLogger(__name__)

# read: jobs, logs, results, pages. submit: read, and run the named workflows (not
# commands). worker: claim and report work, fetch inputs of the pieces it holds, nothing
# else. admin: everything, including jobs that run any command as the service's user.
ROLES = ("read", "submit", "worker", "admin")
_GRANTS = {"read": {"read"}, "submit": {"read", "submit"}, "worker": {"worker"},
           "admin": set(ROLES)}
PREFIX = "sd_"  # tells a sheepdog token apart in a config file or a leaked log


@dataclass(frozen=True)
class Identity:
    """Who a request's token says it is."""

    name: str
    role: str
    # a worker whose outputs may enter the shared cache (an admin's always do)
    trusted: bool = False
    queues: tuple[str, ...] = ()  # a worker token's queues (empty: any)

    def may(self, need: str) -> bool:
        return need in _GRANTS.get(self.role, set())

    def serves(self, queue: str) -> bool:
        """May this worker take pieces of `queue`?"""
        return not self.queues or queue in self.queues


@dataclass
class Entry:
    """One stored token: its name, role and hash (never the token)."""

    name: str
    role: str
    sha256: str
    created: float
    trusted: bool = False
    queues: list[str] = field(default_factory=list)


def tokens_file(settings: Settings) -> Path:
    if settings.tokens_file:
        return Path(settings.tokens_file)
    return config_file().parent / "tokens.json"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode(errors="surrogateescape")).hexdigest()


def same(given: str, token: str) -> bool:
    """Constant-time comparison of any two strings (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(given.encode(errors="surrogateescape"),
                               token.encode(errors="surrogateescape"))


def load(path: Path) -> list[Entry]:
    """The stored tokens; ConfigError names the file and what is wrong with it."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a sheepdog tokens file: {e}") from e
    entries = raw.get("tokens") if isinstance(raw, dict) else None
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: expected {{\"tokens\": [...]}}")
    found = []
    for i, item in enumerate(entries):
        try:
            queues = item.get("queues", [])
            if not isinstance(queues, list):
                raise TypeError("queues")
            entry = Entry(str(item["name"]), str(item["role"]), str(item["sha256"]),
                          float(item.get("created", 0)), bool(item.get("trusted", False)),
                          [str(q) for q in queues])
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{path}: tokens[{i}]: missing or bad field {e}") from e
        if entry.role not in ROLES:
            raise ConfigError(f"{path}: tokens[{i}] ({entry.name}): unknown role "
                              f"{entry.role!r}; one of {', '.join(ROLES)}")
        found.append(entry)
    return found


def _save(path: Path, entries: list[Entry]) -> None:
    """Replace the file in one rename, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"tokens": [asdict(e) for e in entries]}, f, indent=1)
    os.replace(tmp, path)


def add(path: Path, role: str, name: str | None = None, trusted: bool = False,
        queues: tuple[str, ...] = ()) -> tuple[Entry, str]:
    """Make a token; returns its stored entry and the token itself (shown once).
    `trusted` and `queues` are for worker tokens."""
    if role not in ROLES:
        raise ConfigError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if (trusted or queues) and role != "worker":
        raise ConfigError("--trusted and --queue are for worker tokens (--role worker)")
    entries = load(path)
    name = name or f"{role}-{secrets.token_hex(3)}"
    if any(e.name == name for e in entries):
        raise ConfigError(f"a token named {name!r} exists already in {path} (revoke it first)")
    token = PREFIX + secrets.token_urlsafe(32)
    entry = Entry(name, role, digest(token), time.time(), trusted, list(queues))
    _save(path, entries + [entry])
    return entry, token


def revoke(path: Path, name: str) -> bool:
    entries = load(path)
    kept = [e for e in entries if e.name != name]
    if len(kept) == len(entries):
        return False
    _save(path, kept)
    return True


class Registry:
    """The tokens a service accepts: the file's (read again when it changes) and the
    legacy SHEEPDOG_API_TOKENS (every role)."""

    def __init__(self, settings: Settings) -> None:
        self.path = tokens_file(settings)
        self.legacy = tuple(t for t in settings.api_tokens if t)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._entries: list[Entry] = []

    def _current(self) -> list[Entry]:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._entries = load(self.path) if stamp != (0, 0, 0) else []
                except ConfigError as e:  # a broken file opens nothing (fails closed)
                    log.error("%s; its tokens are refused until it is fixed", e)
                    self._entries = []
            return self._entries

    def identify(self, given: str) -> Identity | None:
        """The identity a token opens, or None. Every stored hash is compared, in
        constant time each, whatever matches first."""
        if not given:
            return None
        found: Identity | None = None
        for token in self.legacy:
            if same(given, token) and found is None:
                found = Identity("api", "admin", trusted=True)
        hashed = digest(given)
        for entry in self._current():
            if same(hashed, entry.sha256) and found is None:
                found = Identity(entry.name, entry.role,
                                 trusted=entry.trusted or entry.role == "admin",
                                 queues=tuple(entry.queues))
        return found
