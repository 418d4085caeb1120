"""Slurm command lines and output parsers: pure functions, tested from canned text."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from string import Template

from ...remote import setup_lines

TEMPLATE = Path(__file__).parent / "templates" / "slurm_task.sh"
EXIT_FILE = ".sheepdog.exit"
OUT_FILE, ERR_FILE = ".slurm.out", ".slurm.err"

ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED",
          "RESIZING", "SIGNALING", "STAGE_OUT"}
# ended without the piece itself failing: the node or the scheduler lost it
LOST = {"NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "REVOKED"}
# ended by the cluster while the piece ran: its exit status says only "a signal"
ENDED_BY_CLUSTER = LOST | {"CANCELLED", "TIMEOUT", "OUT_OF_MEMORY"}
# sbatch/squeue errors worth another try (the controller is busy or restarting)
TRANSIENT = ("Socket timed out", "Unable to contact slurm controller", "Connection refused",
             "Resource temporarily unavailable", "Zero Bytes were transmitted")


@dataclass(frozen=True)
class JobState:
    job_id: str
    state: str
    reason: str = ""
    exit_code: int | None = None


def job_script(piece: str, job_name: str, workdir: str, argv: list[str],
               env: dict[str, str], profile: str = "", pythonpath: str = "",
               control: str = "") -> str:
    """The batch script for one piece, from the template; every word shell-quoted.

    It runs in `workdir` and leaves its exit status in `control` (default: workdir).
    """
    setup = setup_lines(profile, pythonpath, env)
    return Template(TEMPLATE.read_text()).substitute(
        job_name=re.sub(r"[^\w.-]", "_", job_name), piece=piece.replace("\n", " "),
        workdir=shlex.quote(workdir), control=shlex.quote(control or workdir),
        setup="\n".join(setup), command=shlex.join(argv))


def sbatch_argv(script: str, workdir: str, job_name: str, partition: str = "",
                account: str = "", time_limit: str = "", control: str = "", cores: int = 0,
                ram_mb: int = 0) -> list[str]:
    """sbatch's command line for one piece; `cores`, `ram_mb`: what it asks for (0: the
    cluster's defaults)."""
    control = control or workdir
    argv = ["sbatch", "--parsable", "--job-name", job_name, "--chdir", workdir,
            "--output", f"{control}/{OUT_FILE}", "--error", f"{control}/{ERR_FILE}"]
    if partition:
        argv += ["--partition", partition]
    if account:
        argv += ["--account", account]
    if time_limit:
        argv += ["--time", time_limit]
    if cores > 0:
        argv += ["--cpus-per-task", str(cores)]
    if ram_mb > 0:
        argv += ["--mem", f"{ram_mb}M"]
    return argv + [script]


def parse_sbatch(stdout: str) -> str:
    """`sbatch --parsable` prints `ID` or `ID;cluster`."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";")[0]
    if not job_id.isdigit():
        raise ValueError(f"sbatch printed no job id: {stdout.strip()[:200]!r}")
    return job_id


def squeue_argv(job_ids: list[str]) -> list[str]:
    """One squeue for any number of jobs (all states, so ended ones still show)."""
    return ["squeue", "--states=all", "-h", "-j", ",".join(job_ids), "-o", "%i %T %r"]


def parse_squeue(stdout: str) -> dict[str, JobState]:
    """`%i %T %r` lines; a pending array's `12_[3-4]` stays one record."""
    states = {}
    for line in stdout.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 2:
            states[parts[0]] = JobState(parts[0], parts[1], parts[2] if len(parts) > 2 else "")
    return states


def scontrol_argv(job_id: str) -> list[str]:
    return ["scontrol", "show", "job", "-o", job_id]


def parse_scontrol(stdout: str) -> JobState | None:
    """JobState= and ExitCode=code:signal from `scontrol show job -o`."""
    fields = dict(re.findall(r"(\w+)=(\S*)", stdout))
    if "JobId" not in fields:
        return None
    code, _, signal = fields.get("ExitCode", "").partition(":")
    exit_code = None
    if code.isdigit():
        exit_code = 128 + int(signal) if signal.isdigit() and int(signal) else int(code)
    return JobState(fields["JobId"], fields.get("JobState", ""), fields.get("Reason", ""),
                    exit_code)


def transient(stderr: str) -> bool:
    return any(t in stderr for t in TRANSIENT)
