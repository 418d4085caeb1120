"""A real sshd on loopback for the shell backend's tests (see shared/docs/TESTBED.md)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

RECORDED_GUIX = '''#!/bin/sh
# A recorded `guix` for tests: guix itself cannot be installed on this machine kind.
# It answers what the real one prints for the calls sheepdog makes.
case "$1 $2" in
  "describe --format=channels") cat "$(dirname "$0")/../share/recorded-channels.scm" ;;
  "--version "*|"--version") echo "guix (GNU Guix) 1.4.0-recorded" ;;
  *) echo "guix: recorded stand-in does not know: $*" >&2; exit 2 ;;
esac
'''


@dataclass
class Sshd:
    dir: Path
    port: int
    proc: subprocess.Popen
    host: str = "127.0.0.1"

    def env(self) -> dict[str, str]:
        return {"SHEEPDOG_SSH_CONFIG": str(self.dir / "ssh_config"),
                "SHEEPDOG_INVENTORY": str(self.dir / "hosts.toml")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def drop_connections(self) -> None:
        """Kill every session sshd serves (its children), as a network cut would."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True,
                             text=True).stdout.split()
        for pid in out:
            os.kill(int(pid), signal.SIGKILL)


def keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return (path.with_suffix(".pub") if path.suffix else Path(f"{path}.pub")).read_text()


def host_python(profile: Path) -> Path:
    """Make `profile` the host's Python environment, as its Guix profile would be: the
    interpreter with numpy and Pillow and nothing else (no redis, rq, paramiko, flask,
    click...), so a test host never borrows what was installed for the tests, nor what
    the machine's own interpreter happens to carry.

    The profile is a virtualenv of the base interpreter (never the tests' venv, never
    its system site-packages): `profile/bin/python3` finds `profile/pyvenv.cfg` the way
    a Guix profile's python3 finds the profile's site-packages, whatever it links to."""
    import numpy
    import PIL

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(profile)], check=True)
    site = next((profile / "lib").glob("python3*/site-packages"))
    wanted = {"numpy", "pil", "pillow"}  # the packages, their .libs and dist-info
    for where in {Path(p.__file__).resolve().parent.parent for p in (numpy, PIL)}:
        for sibling in where.iterdir():
            if sibling.name.lower().split("-")[0].split(".")[0] in wanted:
                (site / sibling.name).symlink_to(sibling)
    python = profile / "bin" / "python3"
    check = subprocess.run([str(python), "-c", HOST_PYTHON_CHECK], capture_output=True,
                           text=True, cwd=profile)
    assert check.returncode == 0, check.stderr
    return python


# What a host's Python must and must not import (run on the host by a test, too).
HOST_PYTHON_CHECK = """\
import importlib.util, numpy, PIL
leaked = [m for m in ("redis", "rq", "flask", "paramiko", "click", "sheepdog")
          if importlib.util.find_spec(m)]
if leaked: raise SystemExit(f"leaked into the host Python: {leaked}")
print("numpy", numpy.__version__, "Pillow", PIL.__version__)
"""


def make_profile(root: Path, channels: str) -> Path:
    """A host profile as Guix would make it: bin/ with guix, gemma, python3 (numpy and
    Pillow in its site-packages); etc/profile."""
    profile = root / "profile"
    host_python(profile)
    (profile / "share").mkdir()
    (profile / "etc").mkdir()
    guix = profile / "bin" / "guix"
    guix.write_text(RECORDED_GUIX)
    guix.chmod(0o755)
    (profile / "share" / "recorded-channels.scm").write_text(channels)
    tools = [("gemma", shutil.which("gemma")), ("ls", shutil.which("ls")),
             ("gzip", shutil.which("gzip")), ("ssh", shutil.which("ssh"))]
    for name, target in tools:
        if target:
            (profile / "bin" / name).symlink_to(target)
    (profile / "etc" / "profile").write_text(f'export PATH="{profile}/bin:$PATH"\n')
    return profile


def start(root: Path, port: int, listen: str = "127.0.0.1", name: str = "testhost",
          netns: str | None = None, channels: str = "", inventory_extra: str = "") -> Sshd:
    root.mkdir(parents=True, exist_ok=True)
    host_pub = keygen(root / "host_key")
    client_pub = keygen(root / "id")
    (root / "authorized_keys.root").write_text(client_pub)
    (root / "sshd_config").write_text("\n".join([
        f"Port {port}", f"ListenAddress {listen}", f"HostKey {root / 'host_key'}",
        f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root}/authorized_keys.%u",
        "PubkeyAuthentication yes", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
        "StrictModes no", "UsePAM no", "Subsystem sftp internal-sftp", ""]))
    kind, key = host_pub.split()[:2]
    (root / "known_hosts").write_text(f"[{listen}]:{port} {kind} {key}\n")
    profile = make_profile(root, channels)
    (root / "ssh_config").write_text("\n".join([
        f"Host {name}", f"  HostName {listen}", f"  Port {port}", "  User root",
        f"  IdentityFile {root / 'id'}", f"  UserKnownHostsFile {root / 'known_hosts'}", ""]))
    # the host's admin sets what this machine kind needs (OpenBLAS's CPU kernel)
    blas = "".join(f'{k} = "{v}"\n' for k, v in os.environ.items() if k.startswith("OPENBLAS_"))
    (root / "hosts.toml").write_text(
        f'[hosts.{name}]\nworkdir = "{root / "remote"}"\nguix_profile = "{profile}"\n'
        + inventory_extra + f"[hosts.{name}.env]\n{blas}")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    argv = ["/usr/sbin/sshd", "-D", "-e", "-f", str(root / "sshd_config")]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(root / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = subprocess.run(["ssh-keyscan", "-T", "1", "-p", str(port), listen],
                               capture_output=True, text=True)
        if probe.stdout.strip():
            return Sshd(root, port, proc, listen)
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"sshd did not start: {(root / 'sshd.log').read_text()}")
