"""The Slurm backend: pure command builders and parsers, then a real single-node Slurm."""

from __future__ import annotations

import json
import time

import pytest
import sshd
from conftest import free_port, sheepdog, wait_for

from sheepdog import logs, store
from sheepdog.backends.slurm import commands as cmd


def test_sbatch_and_squeue_and_scontrol_are_parsed_from_their_real_text():
    assert cmd.parse_sbatch("4711\n") == "4711"
    assert cmd.parse_sbatch("4711;octopus\n") == "4711"
    with pytest.raises(ValueError):
        cmd.parse_sbatch("sbatch: error: Batch job submission failed\n")
    states = cmd.parse_squeue("12 RUNNING None\n13_[3-4] PENDING Resources\n14 NODE_FAIL "
                              "NodeDown\n")
    assert states["12"].state == "RUNNING"
    assert states["13_[3-4]"].reason == "Resources"  # a pending array range: one record
    assert states["14"].state in cmd.LOST
    done = cmd.parse_scontrol("JobId=9 JobName=x JobState=FAILED Reason=NonZeroExitCode "
                              "ExitCode=3:0 RunTime=00:00:01")
    assert (done.state, done.exit_code) == ("FAILED", 3)
    killed = cmd.parse_scontrol("JobId=10 JobState=CANCELLED Reason=None ExitCode=0:9")
    assert killed.exit_code == 137
    assert cmd.transient("sbatch: error: Socket timed out on send/recv operation")
    assert not cmd.transient("sbatch: error: invalid partition specified: nosuch")


def test_the_job_script_quotes_everything_and_records_the_exit_status():
    script = cmd.job_script("lmm chr 1", "sd-1", "/w d", ["sh", "-c", "echo $HOME; x'y"],
                            {"OPENBLAS_NUM_THREADS": "1"}, control="/c")
    assert "cd '/w d' || exit 97" in script
    assert "sh -c 'echo $HOME; x'\"'\"'y'" in script
    assert "export OPENBLAS_NUM_THREADS=1" in script
    assert "echo $code > /c/.sheepdog.exit.tmp && mv /c/.sheepdog.exit.tmp /c/.sheepdog.exit" \
        in script
    argv = cmd.sbatch_argv("/w/s.sh", "/w", "sd-1", partition="p", account="a")
    assert argv[:2] == ["sbatch", "--parsable"] and argv[-1] == "/w/s.sh"
    assert ["--partition", "p"] == argv[argv.index("--partition"):argv.index("--partition") + 2]
    assert "--cpus-per-task" not in argv and "--mem" not in argv  # the cluster's defaults
    asked = cmd.sbatch_argv("/w/s.sh", "/w", "sd-1", cores=3, ram_mb=700)
    assert asked[-5:] == ["--cpus-per-task", "3", "--mem", "700M", "/w/s.sh"]


@pytest.fixture()
def env_slurm(env, slurm):
    return dict(env, **slurm.env())


def test_a_command_runs_as_a_slurm_job_with_its_output_and_exit_code(env_slurm):
    r = sheepdog("run", "--backend", "slurm", "--", "sh", "-c",
                 "echo from slurm; echo problem >&2; exit 6", env=env_slurm, timeout=120)
    assert r.returncode == 6
    assert "from slurm" in r.stdout.splitlines()
    assert "problem" in r.stderr and "Slurm job" in r.stderr


def test_gemma_loco_on_slurm_equals_the_local_run(env_slurm, tmp_path):
    here = sheepdog("run", "gemma-loco", "--example", "--out", str(tmp_path / "here"),
                    env=dict(env_slurm, SHEEPDOG_HOME=str(tmp_path / "h2")), timeout=300)
    assert here.returncode == 0
    there = sheepdog("run", "gemma-loco", "--example", "--backend", "slurm", "--out",
                     str(tmp_path / "slurm"), env=env_slurm, timeout=600)
    assert there.returncode == 0, there.stderr[-3000:]
    assert there.stderr.count("Slurm job") == 41
    assert (tmp_path / "slurm" / "assoc.txt").read_text() == \
        (tmp_path / "here" / "assoc.txt").read_text()


def _slurm_id(conn, job_id):
    for line in logs.read(conn, job_id, count=1000):
        if ": Slurm job " in line.text:
            return line.text.rsplit(" ", 1)[1]
    return None


def test_cancel_scancels_the_slurm_job(env_slurm, conn, workers, slurm):
    workers.start(env=env_slurm)
    job_id = sheepdog("run", "--detach", "--backend", "slurm", "--", "sleep", "300",
                      env=env_slurm).stdout.strip()
    slurm_id = wait_for(lambda: _slurm_id(conn, job_id), 60, what="the Slurm job id")
    wait_for(lambda: "RUNNING" in slurm.run("squeue", "-h", "-j", slurm_id, "-o", "%T").stdout,
             60, what="the Slurm job to run")
    sheepdog("cancel", job_id, env=env_slurm)
    try:
        wait_for(lambda: "CANCELLED" in slurm.run("scontrol", "show", "job", "-o",
                                                  slurm_id).stdout, 30, what="scancel")
    except AssertionError:
        print([ln.text for ln in logs.read(conn, job_id)], store.job_tasks(conn, job_id))
        raise


@pytest.mark.fault
def test_a_job_the_cluster_kills_is_submitted_again(env_slurm, conn, workers, slurm, tmp_path):
    marker = tmp_path / "ran-once"
    workers.start(env=env_slurm)
    job_id = sheepdog("run", "--detach", "--backend", "slurm", "--", "sh", "-c",
                      f"if [ -e {marker} ]; then echo again; else touch {marker}; sleep 300; "
                      "fi", env=env_slurm).stdout.strip()
    first = wait_for(lambda: _slurm_id(conn, job_id), 60, what="the first Slurm job")
    wait_for(marker.exists, 60, what="the first attempt to start")
    slurm.run("scancel", first)  # the cluster, not the user, ends it
    wait_for(lambda: store.get_job(conn, job_id).status in ("success", "error"), 90,
             what="the job to end")
    assert store.get_job(conn, job_id).status == "success"
    assert store.job_tasks(conn, job_id)[0].attempts == 2
    text = " ".join(ln.text for ln in logs.read(conn, job_id, count=1000))
    assert f"Slurm job {first} ended CANCELLED" in text and "again" in text


def test_sbatch_over_ssh_and_a_rejected_partition_is_one_clear_line(env, slurm, tmp_path):
    extra = 'partition = "nosuch"\nbackend = "slurm"\n'
    host = sshd.start(tmp_path / "login", free_port(), name="login", inventory_extra=extra)
    try:
        inv = host.dir / "hosts.toml"
        inv.write_text(inv.read_text() + f'SLURM_CONF = "{slurm.conf}"\n')
        env_login = dict(env, **host.env())
        r = sheepdog("run", "--backend", "slurm", "--host", "login", "--", "true",
                     env=env_login, timeout=120)
        assert r.returncode != 0
        assert "sbatch failed on login" in r.stderr and "nosuch" in r.stderr.lower()
        inv.write_text(inv.read_text().replace('partition = "nosuch"\n', ""))
        r = sheepdog("run", "--backend", "slurm", "--host", "login", "--", "sh", "-c",
                     "echo via login node", env=env_login, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "via login node" in r.stdout
    finally:
        host.stop()
    time.sleep(0)
    json.dumps({})
