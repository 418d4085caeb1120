"""Open the Redis connection every sheepdog process uses: explicit URL or embedded default."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from . import embedded
from .config import Settings
from .defaults import REDIS_MAX_CONNECTIONS, REDIS_RETRY
from .errors import RedisUnavailable


def url_for(settings: Settings) -> str:
    """The URL in force: SHEEPDOG_REDIS_URL, else the embedded server (started if needed)."""
    return settings.redis_url or embedded.ensure(settings.home)


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


def connect(settings: Settings) -> redis.Redis:
    """A checked connection; RedisUnavailable names the URL when the server is down."""
    url = url_for(settings)
    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30,
                                    max_connections=REDIS_MAX_CONNECTIONS)
        conn.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as e:
        raise RedisUnavailable(url, str(e) or type(e).__name__,
                               transient=not isinstance(e, ValueError)) from e
    return conn
