"""Who is working: every worker, Redis or pull, registers here under a key with a TTL
that it renews; a registration not renewed expires with its worker. Submitters ask
`live_workers` whether anyone serves a queue."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

from . import keys, liveness
from .logs import _redis_error

if TYPE_CHECKING:
    import redis


def announce(conn: redis.Redis, name: str, queues: list[str], ttl: float,
             **info: object) -> None:
    """Register (or renew) worker `name` as serving `queues` for `ttl` seconds."""
    record = {"name": name, "queues": queues, "seen": time.time(), **info}
    pipe = conn.pipeline()
    pipe.set(keys.worker(name), json.dumps(record), ex=max(1, int(ttl)))
    pipe.sadd(keys.workers(), name)
    pipe.sadd(keys.queues_served(), *queues)
    pipe.execute()


def holder(conn: redis.Redis, name: str) -> dict[str, object] | None:
    """The live worker registered as `name`, if there is one: a second worker of the
    same name would share its records (GN3's taken lists, its pieces' owner), and one
    leaving would unregister the other."""
    raw = conn.get(keys.worker(name))
    if raw is None:
        return None
    info: dict[str, object] = json.loads(raw)
    return None if liveness.gone(str(info.get("process", ""))) else info


def unregister(conn: redis.Redis, name: str) -> None:
    """A worker leaving says so (else its registration expires by itself)."""
    try:
        conn.delete(keys.worker(name))
        conn.srem(keys.workers(), name)
    except _redis_error():
        pass


def registered(conn: redis.Redis, name: str) -> bool:
    return bool(conn.exists(keys.worker(name)))


def live_workers(conn: redis.Redis, queue: str | None = None) -> list[dict[str, object]]:
    """Workers whose registration has not expired, optionally only those serving queue."""
    names = [n.decode() for n in conn.smembers(keys.workers())]
    if not names:
        return []
    found = []
    for name, raw in zip(names, conn.mget([keys.worker(n) for n in names]), strict=True):
        if raw is None:
            conn.srem(keys.workers(), name)
            continue
        info = json.loads(raw)
        if liveness.gone(str(info.get("process", ""))):
            continue  # killed on this host: its registration only has not expired yet
        if queue is None or queue in info.get("queues", []):
            found.append(info)
    return found


