"""Two hosts: sshd on loopback, and a second sshd in a network namespace of its own."""

from __future__ import annotations

import os
import subprocess

import pytest
import sshd
from conftest import free_port, sheepdog

from sheepdog import store

CHANNELS = (sshd.Path(__file__).parent.parent / "guix" / "channels.scm").read_text()


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


@pytest.fixture()
def two_hosts(tmp_path, env):
    tag = f"{os.getpid() % 10000}"
    ns, outside, inside = f"sdns{tag}", f"sdo{tag}", f"sdi{tag}"
    subnet = f"10.200.{os.getpid() % 200 + 1}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", ns)
        ip("addr", "add", f"{subnet}.1/24", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", ns, "addr", "add", f"{subnet}.2/24", "dev", inside)
        ip("-n", ns, "link", "set", inside, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        near = sshd.start(tmp_path / "near", free_port(), name="near", channels=CHANNELS)
        far = sshd.start(tmp_path / "far", 2222, listen=f"{subnet}.2", name="far", netns=ns,
                         channels=CHANNELS)
        # one ssh config and inventory naming both, plus `inner`: `far` through `near`
        config = tmp_path / "ssh_config"
        far_cfg = (far.dir / "ssh_config").read_text()
        config.write_text((near.dir / "ssh_config").read_text() + far_cfg
                          + far_cfg.replace("Host far", "Host inner") + "  ProxyJump near\n")
        inventory = tmp_path / "hosts.toml"
        inner = (far.dir / "hosts.toml").read_text().replace("hosts.far", "hosts.inner")
        inventory.write_text((near.dir / "hosts.toml").read_text() + "\n" +
                             (far.dir / "hosts.toml").read_text() + "\n" + inner)
        yield dict(env, SHEEPDOG_SSH_CONFIG=str(config), SHEEPDOG_INVENTORY=str(inventory))
        far.stop()
        near.stop()
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_the_namespaced_host_is_a_host_of_its_own(two_hosts):
    r = sheepdog("run", "--backend", "shell", "--host", "far", "--", "sh", "-c",
                 "ip -brief addr | grep -c UP", env=two_hosts)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "1"  # only its veth end: it sees its own network


def test_a_race_between_two_hosts_cancels_the_slower(two_hosts, conn):
    script = 'case "$PWD" in */far/*) sleep 60;; esac; echo "won in $PWD"'
    r = sheepdog("run", "--race", "near,far", "--", "sh", "-c", script, env=two_hosts,
                 timeout=60)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "winner: near" in r.stderr and "cancelled: far lost the race" in r.stderr
    jobs = {j.params.get("race"): j.status for j in store.list_jobs(conn)}
    assert jobs == {"near": "success", "far": "cancelled"}


def test_proxyjump_reaches_a_host_through_another(two_hosts):
    r = sheepdog("run", "--backend", "shell", "--host", "inner", "--", "sh", "-c",
                 'echo "inner says hi"', env=two_hosts)
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "inner says hi"
