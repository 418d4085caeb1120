"""Open the Redis connection every sheepdog process uses: explicit URL or embedded default."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from . import embedded
from .config import Settings
from .defaults import OUTAGE_PATIENCE, REDIS_MAX_CONNECTIONS, REDIS_RETRY
from .errors import ConfigError, RedisUnavailable


def url_for(settings: Settings) -> str:
    """The URL in force: SHEEPDOG_REDIS_URL, else the embedded server (started if needed)."""
    return settings.redis_url or embedded.ensure(settings.home)


class _RideOut(Retry):
    """redis-py's retry of a command whose connection failed, said once: a client that
    waits for a job rides out a restart or failover of Redis instead of dying with a
    traceback (a step inside a WATCH starts its transaction over, as on any conflict)."""

    said = threading.Event()  # once per process, however many connections wait

    def __init__(self, say: Callable[[str], None], patience: float) -> None:
        super().__init__(ExponentialBackoff(cap=REDIS_RETRY, base=0.05),
                         int(patience / REDIS_RETRY) + 8)
        self._say = say

    def call_with_retry(self, do: Any, fail: Any, *args: Any, **kwargs: Any) -> Any:
        def told(error: Exception, *rest: Any) -> Any:
            if not _RideOut.said.is_set():
                _RideOut.said.set()
                self._say(f"Redis is unreachable ({error}); waiting for it")
            return fail(error, *rest)

        return super().call_with_retry(do, told, *args, **kwargs)


def ride_out(conn: redis.Redis, say: Callable[[str], None],
             patience: float = OUTAGE_PATIENCE) -> redis.Redis:
    """The connection, its commands retried through an outage of up to `patience`
    seconds (the first connect still fails at once: a server that is down says so)."""
    conn.set_retry(_RideOut(say, patience))
    return conn


def connect_waiting(settings: Settings, say: Callable[[str], None],
                    stop: Callable[[], bool] = lambda: False) -> redis.Redis:
    """connect(), but a server that is down is waited for (a worker started during an
    outage comes up when Redis does); `say` hears of it once. A bad URL still fails."""
    pause, said = 0.1, False
    while True:
        try:
            return connect(settings)
        except RedisUnavailable as e:
            if stop() or not e.transient:
                raise
            if not said:
                say(f"{e}; waiting for it")
                said = True
            time.sleep(pause)
            pause = min(pause * 2, REDIS_RETRY)


def shown(url: str) -> str:
    """The URL as it may be printed: its password hidden."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + parts.netloc.rsplit("@", 1)[1]))


def _tls(settings: Settings, url: str) -> dict[str, object]:
    """redis-py's TLS options for a rediss:// URL: the CA that signs the server's
    certificate, and this client's certificate if the server asks for one."""
    if not url.startswith("rediss://"):
        return {}
    for name, path in (("SHEEPDOG_REDIS_CA", settings.redis_ca),
                       ("SHEEPDOG_REDIS_CERT", settings.redis_cert),
                       ("SHEEPDOG_REDIS_KEY", settings.redis_key)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}={path}: no such file")
    if bool(settings.redis_cert) != bool(settings.redis_key):
        raise ConfigError("SHEEPDOG_REDIS_CERT and SHEEPDOG_REDIS_KEY go together")
    options: dict[str, object] = {"ssl_cert_reqs": "required"}
    if settings.redis_ca:
        options["ssl_ca_certs"] = settings.redis_ca
    if settings.redis_cert:
        options.update(ssl_certfile=settings.redis_cert, ssl_keyfile=settings.redis_key)
    return options


def connect(settings: Settings, **options: Any) -> redis.Redis:
    """A checked connection; RedisUnavailable names the URL when the server is down.
    `options`: more of redis-py's connection options (the web process's parser)."""
    url = url_for(settings)
    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30,
                                    max_connections=REDIS_MAX_CONNECTIONS,
                                    **_tls(settings, url), **options)
        conn.ping()
    except redis.AuthenticationError as e:
        raise RedisUnavailable(shown(url), f"{e}: check the user name and password in "
                               "SHEEPDOG_REDIS_URL (redis://USER:PASSWORD@HOST...)",
                               transient=False) from e
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as e:
        reason = str(e) or type(e).__name__
        if "CERTIFICATE_VERIFY_FAILED" in reason or "certificate verify failed" in reason:
            raise RedisUnavailable(shown(url), f"{reason}: the server's certificate does not "
                                   "verify; set SHEEPDOG_REDIS_CA to the CA file that signed "
                                   "it", transient=False) from e
        if url.startswith("redis://") and any(
                word in reason for word in ("Connection closed by server", "reset by peer")):
            reason += " (a server that speaks only TLS? then use rediss://)"
        raise RedisUnavailable(shown(url), reason,
                               transient=not isinstance(e, ValueError)) from e
    return conn
