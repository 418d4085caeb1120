"""`sheepdog hosts check`: is a host fit to run sheepdog's pieces, and if not, what to do."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from . import ssh
from .cache import Cache
from .errors import SheepdogError
from .hosts import Host
from .process import capture
from .remote import RemoteDir, prefix

# the project's guix/ (a link in the source tree, package data in an installed wheel)
GUIX_DIR = Path(__file__).resolve().parent / "guix"
MIN_FREE_GB = 5.0


@dataclass
class Check:
    """One item of the verdict: ok / warn / fail, what was found, and the remedy."""

    name: str
    status: str
    found: str
    remedy: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def pinned_commits(text: str) -> dict[str, str]:
    """channel name -> commit, from a channels.scm (ours or `guix describe`'s output)."""
    found = {}
    for block in re.split(r"\(channel\b", text)[1:]:
        name = re.search(r"\(name\s+'([\w-]+)\)", block)
        commit = re.search(r'\(commit\s+"([0-9a-f]{7,40})"\)', block)
        if name and commit:
            found[name.group(1)] = commit.group(1)
    return found


def manifest_tools(text: str) -> list[str]:
    """Package names listed in manifest.scm's specifications->manifest."""
    body = text.split("specifications->manifest", 1)[-1]
    return re.findall(r'"([\w.+-]+)"', body)


def _profile_prefix(host: Host) -> str:
    return prefix(host.guix_profile, {})


def _guix(conn: ssh.Connection, host: Host, pinned: dict[str, str]) -> list[Check]:
    code, out, err = conn.run(_profile_prefix(host) + "guix describe --format=channels")
    if code != 0:
        verdict = "warn" if host.allow_without_guix else "fail"
        return [Check("guix", verdict, "guix is not available" + (f": {err.strip()[:200]}"
                                                                   if err.strip() else ""),
                      "install Guix (https://guix.gnu.org/manual/en/html_node/Installation"
                      ".html), or set allow_without_guix = true for this host to run "
                      "without a reproducible environment")]
    theirs = pinned_commits(out)
    checks = []
    for channel, commit in pinned.items():
        have = theirs.get(channel)
        if have == commit:
            checks.append(Check(f"guix channel {channel}", "ok", f"at the pinned {commit[:12]}"))
        else:
            checks.append(Check(
                f"guix channel {channel}", "fail",
                f"at {have[:12] if have else 'nothing'}, pinned {commit[:12]}",
                f"guix pull -C guix/channels.scm on {host.name}, or run pieces with "
                "'guix time-machine -C guix/channels.scm -- shell -m guix/manifest.scm'"))
    return checks


def _tools(conn: ssh.Connection, host: Host, tools: list[str]) -> list[Check]:
    commands = {"gemma": "gemma", "python": "python3", "coreutils": "ls", "gzip": "gzip",
                "openssh": "ssh"}
    wanted = [t for t in tools if t in commands]
    if host.guix_profile:
        # with a profile, pieces run the profile's tools: one elsewhere on PATH won't do
        script = "; ".join(f"test -x {ssh.quote([host.guix_profile + '/bin/' + commands[t]])}"
                           f" && echo {t}" for t in wanted)
    else:
        script = "; ".join(f"command -v {ssh.quote([commands[t]])} >/dev/null && echo {t}"
                           for t in wanted)
    _, out, _ = conn.run(script)
    have = set(out.split())
    checks = [Check(f"tool {t}", "ok" if t in have else "fail",
                    "present" if t in have else
                    ("missing from " + host.guix_profile if host.guix_profile else "missing"),
                    "" if t in have else f"guix package -m guix/manifest.scm -p "
                    f"{host.guix_profile or '~/.guix-profile'}") for t in wanted]
    code, out, _ = conn.run(_profile_prefix(host) + "python3 -c 'import numpy, PIL'")
    checks.append(Check("python libraries", "ok" if code == 0 else "fail",
                        "numpy and Pillow import" if code == 0 else "numpy/Pillow missing",
                        "" if code == 0 else "install python-numpy and python-pillow "
                        "(guix/manifest.scm)"))
    return checks


_GEMMA_VERSION = re.compile(r"GEMMA\s+(\S+(?:\s+\([0-9-]+\))?)")


def local_gemma_version() -> str | None:
    """This machine's GEMMA version, to compare a host's with (None: no GEMMA here)."""
    try:
        _, out, _ = capture(["gemma"], together=True, timeout=30)
    except OSError:  # TimeoutError included
        return None
    found = _GEMMA_VERSION.search(out)
    return found.group(1) if found else None


def _gemma(conn: ssh.Connection, host: Host, local_version: str | None) -> Check:
    _, out, _ = conn.run(_profile_prefix(host) + "gemma 2>&1 | head -5")
    found = _GEMMA_VERSION.search(out)
    if not found:
        return Check("gemma version", "fail", "no GEMMA",
                     f"install GEMMA on {host.name} (guix/manifest.scm, or apt-get install gemma)")
    version = found.group(1)
    if local_version and version != local_version:
        return Check("gemma version", "warn", f"{version} (here: {local_version})",
                     "results would differ from local ones: align the GEMMA versions")
    return Check("gemma version", "ok", version)


def _disk(conn: ssh.Connection, host: Host, workdir: str) -> Check:
    q = ssh.quote([workdir])
    code, out, err = conn.run(f"mkdir -p {q} && df -Pk {q} | tail -1")
    try:
        free_gb = int(out.split()[3]) / 1024 / 1024
    except (IndexError, ValueError):
        return Check("free disk", "fail", f"cannot read free space of {workdir}: {err.strip()}",
                     f"make {workdir} writable, or set workdir for {host.name} in the inventory")
    status = "ok" if free_gb >= MIN_FREE_GB else "warn"
    return Check("free disk", status, f"{free_gb:.1f} GB free in {workdir}",
                 "" if status == "ok" else f"free space in {workdir} (cache: sheepdog cache clear)")


def _slurm(conn: ssh.Connection, host: Host) -> Check:
    _, out, _ = conn.run(_profile_prefix(host) + "command -v sbatch")
    if out.strip():
        return Check("slurm", "ok", f"sbatch at {out.strip()}")
    return Check("slurm", "warn" if host.backend != "slurm" else "fail", "no sbatch",
                 "" if host.backend != "slurm" else f"install the Slurm client on {host.name}")


def check_host(host: Host, cache: Cache, local_gemma: str | None = None) -> list[Check]:
    """Every verdict for a host; an unreachable host is one failed check, not an error."""
    try:
        conn = ssh.get(host)
    except SheepdogError as e:
        return [Check("connect", "fail", str(e),
                      "check the Host entry in ~/.ssh/config and that the host is up")]
    checks = [Check("connect", "ok", f"{host.user}@{host.hostname}:{host.port}")]
    pinned = pinned_commits((GUIX_DIR / "channels.scm").read_text())
    tools = manifest_tools((GUIX_DIR / "manifest.scm").read_text())
    try:
        workdir = RemoteDir(host, cache).workdir()
        checks += _guix(conn, host, pinned)
        checks += _tools(conn, host, tools)
        checks.append(_gemma(conn, host, local_gemma))
        checks.append(_disk(conn, host, workdir))
        checks.append(_slurm(conn, host))
    except SheepdogError as e:
        checks.append(Check("session", "fail", str(e), "reconnect and check again"))
    return checks
