"""A real single-node Slurm (munge + slurmctld + slurmd) for tests; see TESTBED.md."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Slurm:
    dir: Path
    conf: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *argv: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=dict(os.environ, **self.env()), text=True,
                              capture_output=True, timeout=timeout)

    def stop(self) -> None:
        try:
            self.run("scancel", "--user", "root", timeout=5)
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)
        for proc in reversed(self.procs):  # slurmd, slurmctld, munged
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        subprocess.run(["pkill", "-9", "-f", f"slurmstepd.*{self.dir}"], check=False)


def start(root: Path, port: int) -> Slurm:
    root.mkdir(parents=True, exist_ok=True)
    munge = root / "munge"
    munge.mkdir(mode=0o700)
    key = munge / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sockdir = root / "munge-sock"
    sockdir.mkdir(mode=0o755)
    socket = sockdir / "munge.socket"
    for d in ("state", "spool", "log"):
        (root / d).mkdir()
    cpus = os.cpu_count() or 1
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=sheepdogtest", "SlurmctldHost=localhost", "SlurmUser=root",
        f"SlurmctldPort={port}", f"SlurmdPort={port + 1}", "AuthType=auth/munge",
        "CredType=cred/munge", f"AuthInfo=socket={socket}",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={root / 'log' / 'jobcomp.txt'}",
        "MinJobAge=3600", "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
        # a piece sent as another ends waits for the main scheduling pass: each 1 s here
        "SchedulerParameters=sched_interval=1",
        f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=512 "
        "State=UNKNOWN",
        "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP", ""]))
    env = dict(os.environ, SLURM_CONF=str(conf))
    slurm = Slurm(root, conf)
    slurm.procs.append(subprocess.Popen(
        ["/usr/sbin/munged", "--foreground", "--force", f"--socket={socket}",
         f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
         f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 10
    while not socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for argv in (["/usr/sbin/slurmctld", "-D", "-f", str(conf)],
                 ["/usr/sbin/slurmd", "-D", "-f", str(conf), "-N", "localhost"]):
        slurm.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            state = slurm.run("sinfo", "-h", "-n", "localhost", "-o", "%T", timeout=3).stdout
        except subprocess.TimeoutExpired:
            state = ""
        if state.strip() == "idle":
            return slurm
        time.sleep(0.2)
    slurm.stop()
    raise RuntimeError("slurm did not come up: " +
                       (root / "log" / "slurmctld.log").read_text()[-2000:])
