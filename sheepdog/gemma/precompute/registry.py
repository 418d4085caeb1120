"""Which precomputed datasets `sheepdog serve` serves: name -> directory and latest job,
in the job store's Redis."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from ... import keys
from ...errors import FieldError
from ...models import Job


def register(conn: redis.Redis, job: Job) -> None:
    """`serve` serves every dataset registered in its Redis."""
    conn.hset(keys.precompute_datasets(), job.params["dataset"],
              json.dumps({"out": job.out_dir, "job": job.id, "owner": job.owner}))


def check_owner(conn: redis.Redis, name: str, owner: str) -> None:
    """A dataset is added to only by the token that made it (403 for another)."""
    entry = datasets(conn).get(name)
    if entry is not None and entry.get("owner", "") != owner:
        raise FieldError("name", f"dataset {name!r} belongs to another token; choose "
                         "another name", 403)


def datasets(conn: redis.Redis) -> dict[str, dict[str, str]]:
    return {k.decode() if isinstance(k, bytes) else k: json.loads(v)
            for k, v in conn.hgetall(keys.precompute_datasets()).items()}


def dataset_dir(conn: redis.Redis, name: str) -> tuple[Path, str]:
    """(the dataset's directory, its latest job); 404 for a name never registered."""
    entry = datasets(conn).get(name)
    if entry is None:
        raise FieldError("dataset", f"no precomputed dataset {name!r}", 404)
    return Path(entry["out"]), entry["job"]
