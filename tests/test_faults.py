"""The standing fault suite's GEMMA case: a LOCO scan killed at random points and run
again gives the clean run's result byte for byte, with no partial entry in the cache.
(The other faults live with their mechanisms, all marked `fault`: SIGKILLed workers in
test_durability, Redis killed and restarted in test_outages, dropped ssh in
test_shell_backend, a vanished Slurm job in test_slurm_backend, a full disk in
test_disk_full, signals and a server restart under a websocket in test_shutdown.)"""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
from conftest import sheepdog

from sheepdog import store
from sheepdog.cache import Cache

pytestmark = pytest.mark.fault


def _complete(conn, local: Cache) -> list[str]:
    """Published task directories missing an output their task declares."""
    partial = []
    for path in local.tasks.iterdir():
        task = store.get_task(conn, path.name)
        if task is None:
            continue
        partial += [f"{path.name}/{o}" for o in task.outputs if not (path / o).is_file()]
    return partial


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_loco_scan_killed_at_a_random_point_reruns_to_the_same_bytes(env, conn, settings,
                                                                       tmp_path, seed):
    args = ["run", "gemma-loco", "--example"]
    clean = sheepdog(*args, "--out", str(tmp_path / "clean"), env=env, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    local = Cache(settings.cache_dir)
    for entry in local.entries():  # from scratch again: the kill lands mid-computation
        if entry.kind == "task":
            local.remove(entry.id)
    conn.flushdb()
    victim = subprocess.Popen([sys.executable, "-m", "sheepdog", *args, "--out",
                               str(tmp_path / "killed")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.3, 2.0))
    victim.kill()
    victim.wait()
    assert _complete(conn, local) == []  # whatever was published is whole
    again = sheepdog(*args, "--out", str(tmp_path / "again"), env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    for name in ("assoc.txt", "manhattan.svg"):
        assert (tmp_path / "again" / name).read_bytes() == \
            (tmp_path / "clean" / name).read_bytes(), name
    assert _complete(conn, local) == []


def _dataset(env, out) -> dict:
    """Every stored trait's record and peaks (without when it was computed), and the
    hits file: the whole of what a dataset says."""
    import json

    hits = (out / "hits.tsv").read_text()
    traits = sorted({line.split("\t")[0] for line in hits.splitlines()[1:]})
    shown = {}
    for trait in traits:
        r = sheepdog("precompute", "show", str(out), trait, "--json", "--vector", env=env)
        assert r.returncode == 0, (trait, r.stderr[-2000:])
        shown[trait] = _without_when(json.loads(r.stdout))
    return {"hits": hits, "traits": shown}


def _without_when(value):
    """A record without when, where and by which job it was computed (a rerun takes the
    traits the killed run finished from the cache, and says so in `computed_by`)."""
    if isinstance(value, dict):
        return {k: _without_when(v) for k, v in value.items()
                if k not in ("started", "finished", "seconds", "host", "job", "computed",
                             "computed_by")}
    if isinstance(value, list):
        return [_without_when(v) for v in value]
    return value


@pytest.mark.parametrize("seed", [4, 5])
def test_a_precompute_killed_at_a_random_point_reruns_to_the_same_store(env, conn, settings,
                                                                        tmp_path, seed):
    args = ["run", "gemma-precompute", "--example", "--sample", "6", "--batch-size", "2"]
    clean = sheepdog(*args, "--out", str(tmp_path / "clean" / "bxd"), env=env, timeout=300)
    assert clean.returncode == 0, clean.stderr[-2000:]
    conn.flushdb()  # from scratch again, in a home of its own: the kill lands mid-computation
    env = dict(env, SHEEPDOG_HOME=str(tmp_path / "home2"))
    local = Cache(tmp_path / "home2" / "store")
    out = tmp_path / "killed" / "bxd"  # the same dataset name
    victim = subprocess.Popen([sys.executable, "-m", "sheepdog", *args, "--out", str(out)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.5, 3.0))
    victim.kill()
    victim.wait()
    assert _complete(conn, local) == []  # whatever was published is whole
    again = sheepdog(*args, "--out", str(out), env=env, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    import difflib
    import json

    after, before = (json.dumps(_dataset(env, d), indent=1, sort_keys=True).splitlines()
                     for d in (out, tmp_path / "clean" / "bxd"))
    assert after == before, "\n".join(list(difflib.unified_diff(before, after, lineterm=""))[:60])
    assert _complete(conn, local) == []
