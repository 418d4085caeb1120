"""The shell backend and host checks, against a real sshd on loopback."""

from __future__ import annotations

import json
import os
import time

import pytest
import sshd
from conftest import free_port, sheepdog, wait_for

from sheepdog import logs, store

CHANNELS = (sshd.Path(__file__).parent.parent / "guix" / "channels.scm").read_text()


@pytest.fixture()
def host(tmp_path):
    server = sshd.start(tmp_path / "testhost", free_port(), channels=CHANNELS)
    yield server
    server.stop()


@pytest.fixture()
def env_ssh(env, host):
    return dict(env, **host.env())


def test_a_command_runs_on_the_host_streaming_back_with_its_exit_code(env_ssh):
    r = sheepdog("run", "--backend", "shell", "--host", "testhost", "--", "sh", "-c",
                 'echo "out $1"; echo err >&2; exit 5', "x", "a b; $(rm -rf /) 'q'", env=env_ssh)
    assert r.returncode == 5
    assert r.stdout.splitlines() == ["out a b; $(rm -rf /) 'q'"]  # quoted, not run
    assert "err" in r.stderr.splitlines()
    assert "staged" in r.stderr and "to testhost" in r.stderr


def test_a_remote_commands_output_is_read_to_its_end(host, monkeypatch):
    """Output that arrives after the exit status (a child still writing) is kept; a
    background child that never closes its output holds the call only briefly."""
    from sheepdog import hosts, ssh
    for name, value in host.env().items():
        monkeypatch.setenv(name, value)
    conn = ssh.Connection(hosts.resolve("testhost"))
    try:
        code, out, _ = conn.run("echo first; (sleep 0.5; echo last) & exit 3")
        assert (code, out) == (3, "first\nlast\n")
        for _ in range(20):  # the lines of many short commands, none lost
            code, out, _ = conn.run("seq 1 2000")
            assert code == 0 and out.split() == [str(n) for n in range(1, 2001)]
        started = time.monotonic()
        code, out, _ = conn.run("echo here; sleep 30 & exit 0")
        assert (code, out) == (0, "here\n") and time.monotonic() - started < 10
    finally:
        conn.close()


def test_the_hosts_directory_is_looked_at_and_published_into_by_sftp(host, monkeypatch,
                                                                     tmp_path):
    """What is there, `mkdir -p`, and publishing a piece's directory by one rename: the
    first of two pieces with the same outputs stays, the second is dropped, no error."""
    from sheepdog import hosts, ssh
    from sheepdog.cache import Cache
    from sheepdog.remote import RemoteDir
    for name, value in host.env().items():
        monkeypatch.setenv(name, value)
    testhost = hosts.resolve("testhost", host.env()["SHEEPDOG_INVENTORY"])
    remote = RemoteDir(testhost, Cache(tmp_path / "cache"))
    try:
        wd = remote.workdir()
        assert wd.startswith(str(host.dir))  # the test host's own directory
        remote.makedirs(f"{wd}/a/b/c")
        remote.makedirs(f"{wd}/a/b/c")  # there already: nothing asked again, no error
        assert os.path.isdir(f"{wd}/a/b/c")
        target = f"{wd}/store/tasks/t1"
        for n in (1, 2):
            remote.write_text(f"{wd}/scratch/p{n}/out.txt", f"piece {n}\n")
            remote.write_text(f"{wd}/scratch/p{n}/.sheepdog.pgid", "1\n")
            remote._move_in(f"{wd}/scratch/p{n}", target, frozenset({".sheepdog.pgid"}))
        assert sorted(os.listdir(target)) == [".complete", "out.txt"]
        assert open(f"{target}/out.txt").read() == "piece 1\n"
        assert not os.path.exists(f"{wd}/scratch/p1") and not os.path.exists(f"{wd}/scratch/p2")
        assert remote.missing([f"{target}/.complete", f"{wd}/nothing", f"{wd}/a"]) == \
            {f"{wd}/nothing"}
    finally:
        remote.close()
        ssh.drop(testhost)

def test_the_hosts_python_has_numpy_and_pillow_and_nothing_of_the_tests(host, monkeypatch):
    """What runs on a host gets only what its Guix profile gives (python3, numpy,
    Pillow): not redis or flask, which the tests' own environment has."""
    from sheepdog import hosts, remote, ssh
    for name, value in host.env().items():
        monkeypatch.setenv(name, value)
    target = hosts.resolve("testhost", str(host.dir / "hosts.toml"))
    conn = ssh.Connection(target)
    try:
        setup = "; ".join(remote.setup_lines(target.guix_profile, "", {}))
        code, out, err = conn.run(f"cd /; {setup}; command -v python3; "
                                  + ssh.quote(["python3", "-c", sshd.HOST_PYTHON_CHECK]))
        assert code == 0, err
        assert out.splitlines()[0] == f"{host.dir}/profile/bin/python3"
        assert out.splitlines()[1].startswith("numpy ") and "Pillow" in out
        for module in ("redis", "flask"):
            code, _, err = conn.run(f"cd /; {setup}; "
                                    + ssh.quote(["python3", "-c", f"import {module}"]))
            assert code == 1 and f"No module named '{module}'" in err
    finally:
        conn.close()


def test_gemma_loco_on_the_host_equals_the_local_run_and_resends_nothing(env_ssh, tmp_path,
                                                                         conn):
    local_env = dict(env_ssh, SHEEPDOG_HOME=str(tmp_path / "local-home"))
    here = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "here"),
                    env=local_env, timeout=300)
    assert here.returncode == 0, here.stderr[-2000:]
    remote = sheepdog("run", "gemma-loco", "--example", "--backend", "shell", "--host",
                      "testhost", "--out", str(tmp_path / "there"), env=env_ssh, timeout=300)
    assert remote.returncode == 0, remote.stderr[-3000:]
    assert "started on shell" in remote.stderr
    assert (tmp_path / "there" / "assoc.txt").read_text() == \
        (tmp_path / "here" / "assoc.txt").read_text()
    again = sheepdog("run", "gemma-loco", "--example", "--backend", "shell", "--host",
                     "testhost", "--force", "--out", str(tmp_path / "again"), env=env_ssh,
                     timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    staged = [ln for ln in again.stderr.splitlines() if ": staged " in ln]
    assert len(staged) == 41
    assert all("staged 0 bytes" in ln for ln in staged)


def test_cancel_kills_the_remote_process_group(env_ssh, conn, workers, tmp_path):
    workers.start(env=env_ssh)
    pids = tmp_path / "remote-pids"
    job_id = sheepdog("run", "--detach", "--backend", "shell", "--host", "testhost", "--",
                      "sh", "-c", f"sleep 120 & echo $! > {pids}; sleep 120",
                      env=env_ssh).stdout.strip()
    wait_for(lambda: pids.exists() and pids.read_text().strip(), 30, what="remote child")
    child = int(pids.read_text())
    assert sheepdog("cancel", job_id, env=env_ssh).returncode == 0
    wait_for(lambda: not os.path.exists(f"/proc/{child}") or
             open(f"/proc/{child}/stat").read().split()[2] == "Z", 30,
             what="the remote background child to be killed")


@pytest.mark.fault
def test_a_dropped_connection_is_noticed_and_the_piece_runs_again(env_ssh, conn, workers,
                                                                  host, tmp_path):
    marker = tmp_path / "first-attempt"
    script = (f'if [ -e {marker} ]; then echo second; else touch {marker}; echo first; '
              'sleep 120; fi')
    workers.start(env=env_ssh)
    job_id = sheepdog("run", "--detach", "--backend", "shell", "--host", "testhost", "--",
                      "sh", "-c", script, env=env_ssh).stdout.strip()
    wait_for(marker.exists, 30, what="the first attempt to start")
    time.sleep(0.5)
    host.drop_connections()
    wait_for(lambda: store.get_job(conn, job_id).status in ("success", "error"), 60,
             what="the job to end after the cut")
    job = store.get_job(conn, job_id)
    text = [ln.text for ln in logs.read(conn, job_id, count=1000)]
    assert job.status == "success", (job.error, text)
    assert store.job_tasks(conn, job_id)[0].attempts == 2
    assert any("connection" in t and "lost" in t for t in text)


def test_unknown_host_down_host_and_refused_key_are_one_line_messages(env_ssh, host, tmp_path):
    r = sheepdog("run", "--backend", "shell", "--host", "nosuchhost", "--", "true", env=env_ssh)
    assert r.returncode != 0 and "unknown host 'nosuchhost'" in r.stderr
    (host.dir / "known_hosts").write_text(
        f"[127.0.0.1]:{host.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl\n")
    r = sheepdog("run", "--backend", "shell", "--host", "testhost", "--", "true", env=env_ssh)
    assert r.returncode != 0 and "has CHANGED and is refused" in r.stderr
    (host.dir / "known_hosts").write_text("")
    r = sheepdog("run", "--backend", "shell", "--host", "testhost", "--", "true", env=env_ssh)
    assert "is not known, so it is refused" in r.stderr and "ssh-keyscan -p" in r.stderr
    host.stop()
    r = sheepdog("run", "--backend", "shell", "--host", "testhost", "--", "true", env=env_ssh)
    assert r.returncode != 0 and "cannot reach 127.0.0.1" in r.stderr
    assert "Traceback" not in r.stderr


def test_hosts_check_reports_an_aligned_host(env_ssh):
    r = sheepdog("hosts", "check", "testhost", "--json", env=env_ssh)
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"]
    verdicts = {c["name"]: c["status"] for c in report["checks"]}
    assert verdicts["guix channel guix"] == "ok"
    assert verdicts["tool gemma"] == "ok" and verdicts["gemma version"] == "ok"
    assert verdicts["free disk"] == "ok" and "slurm" in verdicts


def test_hosts_check_says_how_to_fix_a_misaligned_host(env_ssh, host):
    recorded = host.dir / "profile" / "share" / "recorded-channels.scm"
    recorded.write_text(CHANNELS.replace("c5fa9dd0e96493307cc76ea098a6bca9b076e012",
                                         "0123456789abcdef0123456789abcdef01234567"))
    (host.dir / "profile" / "bin" / "gemma").unlink()
    r = sheepdog("hosts", "check", "testhost", env=env_ssh)
    assert r.returncode == 1
    assert "FAIL  guix channel guix: at 0123456789ab, pinned c5fa9dd0e964" in r.stdout
    assert "guix pull -C guix/channels.scm" in r.stdout
    assert "FAIL  tool gemma: missing from" in r.stdout


def test_a_host_without_guix_is_reported_and_may_be_allowed(env_ssh, host):
    (host.dir / "profile" / "bin" / "guix").unlink()
    r = sheepdog("hosts", "check", "testhost", "--json", env=env_ssh)
    guix = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "guix")
    assert guix["status"] == "fail" and "allow_without_guix" in guix["remedy"]
    inventory = host.dir / "hosts.toml"
    inventory.write_text(inventory.read_text().replace(
        "[hosts.testhost]\n", "[hosts.testhost]\nallow_without_guix = true\n"))
    r = sheepdog("hosts", "check", "testhost", "--json", env=env_ssh)
    guix = next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "guix")
    assert guix["status"] == "warn" and r.returncode == 0, r.stdout


RACE = 'case "$PWD" in */remote/*) sleep {slow};; esac; echo "done in $PWD"'


def test_a_race_takes_the_first_success_and_cancels_the_rest(env_ssh, conn):
    r = sheepdog("run", "--race", "testhost,local", "--", "sh", "-c", RACE.format(slow=60),
                 env=env_ssh, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "winner: local" in r.stderr
    assert "cancelled: testhost lost the race" in r.stderr
    jobs = {j.params.get("race"): j for j in store.list_jobs(conn)}
    assert jobs["local"].status == "success" and jobs["testhost"].status == "cancelled"


def test_a_race_with_complete_all_lets_every_lane_finish(env_ssh, conn, tmp_path):
    r = sheepdog("run", "gemma-loco", "--example", "--race", "testhost,local",
                 "--complete-all", "--out", str(tmp_path / "out"), env=env_ssh, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "winner:" in r.stderr and "lost the race" not in r.stderr
    jobs = {j.params.get("race"): j for j in store.list_jobs(conn)}
    assert {jobs["local"].status, jobs["testhost"].status} == {"success"}, \
        (jobs["local"].error, jobs["testhost"].error)
    assert (tmp_path / "out" / "assoc.txt").exists()
    assert json.loads((tmp_path / "out" / "result.json").read_text())["counts"]["snps"] == 7320
