"""A full disk, on a small filesystem the test mounts itself: the error names the full
directory (never the input), and nothing half-written is left behind."""

from __future__ import annotations

import io
import json
import subprocess

import pytest
from conftest import BXD, sheepdog

from web import create_app


@pytest.fixture()
def small_home(tmp_path):
    """A 600 KiB tmpfs: room for sheepdog's directories, not for the BXD split."""
    home = tmp_path / "small"
    home.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(home)],
                   check=True)
    yield home
    subprocess.run(["umount", "-l", str(home)], check=False)


@pytest.mark.fault
def test_a_full_cache_disk_is_named_not_the_input(env, small_home):
    r = sheepdog("run", "gemma-loco", "--example", env=dict(env, SHEEPDOG_HOME=str(small_home)))
    assert r.returncode != 0
    assert "no space left on the device holding" in r.stderr and str(small_home) in r.stderr
    assert "BXD_geno.txt.gz: cannot read" not in r.stderr
    leftovers = [p for p in (small_home / "store" / "tmp").iterdir()]
    assert leftovers == []  # no partial copy or split left in scratch


@pytest.mark.fault
def test_an_upload_on_a_full_disk_gets_507_and_leaves_nothing(redis_server, conn, queue,
                                                              small_home):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": small_home, "api_tokens": ("t",),
        "queue": queue, "upload_limit_mb": 8}})
    client = app.test_client()
    big = io.BytesIO(b"1" * (2 * 1024 * 1024))  # larger than the whole filesystem
    r = client.post("/jobs", headers={"Authorization": "Bearer t"},
                    content_type="multipart/form-data",
                    data={"job": json.dumps({"workflow": "gemma-loco"}), "geno": (big, "g.txt"),
                          "pheno": (io.BytesIO((BXD / "BXD_pheno.txt").read_bytes()), "p"),
                          "anno": (io.BytesIO(b"rs1 1 1\n"), "a")})
    assert r.status_code == 507, r.get_json()
    assert "no space left" in r.get_json()["error"]
    assert list((small_home / "uploads").iterdir()) == []


@pytest.mark.fault
def test_a_piece_that_fills_the_disk_fails_saying_so_and_publishes_nothing(env, conn,
                                                                          small_home):
    """A cacheable piece writes past the end of the filesystem it runs on (its
    directory and the store are on the small one)."""
    r = sheepdog("map", "--range", "1:1", "--cache", "--", "sh", "-c",
                 "head -c 3000000 /dev/zero > big.bin", env=dict(env, SHEEPDOG_HOME=str(
                     small_home)), timeout=120, cwd=str(small_home))
    assert r.returncode != 0, r.stderr
    assert "No space left on device" in r.stderr
    assert list((small_home / "store" / "tasks").iterdir()) == []  # nothing published
