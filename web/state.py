"""The one Redis connection and store a web process shares (built on first use)."""

from __future__ import annotations

import threading
from typing import Any

import redis
from flask import current_app

from sheepdog.cache import Cache
from sheepdog.config import Settings
from sheepdog.connection import connect
from sheepdog.tokens import Registry

from . import green

_lock = threading.Lock()


def settings() -> Settings:
    return current_app.config["SETTINGS"]


def conn() -> Any:
    """A Redis client per app (redis-py's pool is thread-safe)."""
    app = current_app
    with _lock:
        if "REDIS" not in app.extensions:
            app.extensions["REDIS"] = green.together(connect(settings(), **green.options()))
    return app.extensions["REDIS"]


def warm(connections: int) -> None:
    """Open this many Redis connections ahead (a burst of requests would otherwise each
    open its own, a few round trips apiece, all at once) and load the store's scripts."""
    pool = conn().connection_pool
    try:
        held = [pool.get_connection() for _ in range(connections)]
    except redis.RedisError:
        return  # Redis is not there yet: requests connect as they come
    for c in held:
        pool.release(c)


def token_registry() -> Registry:
    """The tokens this app accepts (one registry per app, reading its file on change)."""
    app = current_app
    with _lock:
        if "TOKENS" not in app.extensions:
            app.extensions["TOKENS"] = Registry(settings())
    return app.extensions["TOKENS"]


def cache() -> Cache:
    return Cache(settings().cache_dir)
