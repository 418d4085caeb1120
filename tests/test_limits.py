"""Bounded inputs: bundles, uploads and JSON bodies past their limits get 413 naming the
limit, and nothing of them stays on disk."""

from __future__ import annotations

import io
import json
import tarfile
import zlib

import pytest
from conftest import BXD

from web import create_app

TOKEN = "limits-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JOB = {"workflow": "gemma-loco", "inputs": {"geno": "g.txt.gz", "pheno": "p.txt",
                                            "anno": "a.txt"}}


@pytest.fixture()
def client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": (TOKEN,), "queue": queue,
        "upload_limit_mb": 64, "json_limit_mb": 1, "bundle_max_mb": 3,
        "bundle_member_max_mb": 2, "bundle_max_members": 5}})
    return app.test_client()


def _left_behind(home) -> list[str]:
    root = home / "uploads"  # each request's upload directory lives here
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _bundle(members: dict[str, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    buf.seek(0)
    return buf


def _post(client, bundle):
    return client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                       data={"job": json.dumps(JOB), "bundle": (bundle, "b.tar.gz")})


def _zeros_bomb(size: int) -> io.BytesIO:
    """A real tar.gz of one member of `size` zero bytes: a few MB that unpack to `size`."""
    info = tarfile.TarInfo("g.txt.gz")
    info.size = size
    squeeze = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip framing
    out = [squeeze.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    zeros = bytes(64 << 20)
    left = size
    while left:
        step = min(left, len(zeros))
        out.append(squeeze.compress(zeros[:step]))
        left -= step
    out.append(squeeze.compress(bytes(1024)))  # the archive's two closing blocks
    out.append(squeeze.flush())
    return io.BytesIO(b"".join(out))


def test_a_small_bundle_that_unpacks_to_gigabytes_is_refused_before_any_byte(client, home):
    bomb = _zeros_bomb(3 << 30)
    assert len(bomb.getvalue()) < 16 << 20  # small on the wire
    r = _post(client, bomb)
    assert r.status_code == 413, r.get_json()
    body = r.get_json()
    assert body["field"] == "bundle" and "bundle_member_max_mb" in body["error"]
    assert "3,221,225,472 bytes" in body["error"]
    assert _left_behind(home) == []


def test_bundle_total_and_member_count_limits_are_named(client, home):
    mb = bytes(1 << 20)
    r = _post(client, _bundle({f"m{i}": mb for i in range(4)}))  # 4 MB > 3 MB in all
    assert r.status_code == 413 and "bundle_max_mb" in r.get_json()["error"]
    r = _post(client, _bundle({f"m{i}": b"x" for i in range(6)}))
    assert r.status_code == 413 and "bundle_max_members" in r.get_json()["error"]
    assert _left_behind(home) == []


def test_a_bundle_within_the_limits_is_accepted(client):
    good = _bundle({"g.txt.gz": (BXD / "BXD_geno.txt.gz").read_bytes(),
                    "p.txt": (BXD / "BXD_pheno.txt").read_bytes(),
                    "a.txt": (BXD / "BXD_snps.txt").read_bytes()})
    r = _post(client, good)
    assert r.status_code == 202, r.get_json()


def test_json_bodies_and_uploads_past_their_limits_get_413(client, home):
    big = {"workflow": "command", "command": ["echo", "x" * (2 << 20)]}
    r = client.post("/jobs", headers=AUTH, json=big)
    assert r.status_code == 413 and "json_limit_mb" in r.get_json()["error"]
    r = client.post("/jobs", headers=AUTH, content_type="multipart/form-data",
                    data={"job": json.dumps(JOB),
                          "geno": (io.BytesIO(bytes(65 << 20)), "g.txt")})
    assert r.status_code == 413
    assert _left_behind(home) == []
