"""Open the Redis connection every sheepdog process uses: explicit URL or embedded default."""

from __future__ import annotations

import redis

from . import embedded
from .config import Settings
from .errors import RedisUnavailable


def url_for(settings: Settings) -> str:
    """The URL in force: SHEEPDOG_REDIS_URL, else the embedded server (started if needed)."""
    return settings.redis_url or embedded.ensure(settings.home)


def connect(settings: Settings) -> redis.Redis:
    """A checked connection; RedisUnavailable names the URL when the server is down."""
    url = url_for(settings)
    try:
        conn = redis.Redis.from_url(url, socket_connect_timeout=5, health_check_interval=30)
        conn.ping()
    except (redis.ConnectionError, redis.TimeoutError, OSError, ValueError) as e:
        raise RedisUnavailable(url, str(e) or type(e).__name__) from e
    return conn
