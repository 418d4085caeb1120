"""Shared by the pull worker tests and bench: `sheepdog serve` over HTTPS with tokens,
pull workers that see nothing but its URL, and a network namespace for them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import requests

SHEEPDOG = [sys.executable, "-m", "sheepdog"]


def add_token(env: dict[str, str], role: str, name: str) -> str:
    """`sheepdog tokens add`: the token is alone on the last line."""
    done = subprocess.run([*SHEEPDOG, "tokens", "add", "--role", role, "--name", name], env=env,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().splitlines()[-1]


@dataclass
class Service:
    """`sheepdog serve --certfile --keyfile` on `bind`, no local worker."""

    env: dict[str, str]
    bind: str
    certfile: Path
    keyfile: Path
    ca: Path
    proc: subprocess.Popen | None = None
    logs: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"https://{self.bind}"

    def start(self) -> None:
        out = open(Path(self.env["SHEEPDOG_HOME"]) / f"serve.{len(self.logs)}.log", "w")
        self.logs.append(out.name)
        self.proc = subprocess.Popen(
            [*SHEEPDOG, "serve", "--bind", self.bind, "--local-workers", "0",
             "--certfile", str(self.certfile), "--keyfile", str(self.keyfile)],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, Path(out.name).read_text()[-3000:]
            try:
                if requests.get(self.url + "/health", verify=str(self.ca), timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError("sheepdog serve did not come up: "
                             + Path(out.name).read_text()[-3000:])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def api(self, method: str, path: str, token: str, **kw) -> requests.Response:
        return requests.request(method, self.url + path, verify=str(self.ca), timeout=30,
                                headers={"Authorization": f"Bearer {token}"}, **kw)


def worker_env(base: dict[str, str], home: Path, token: str) -> dict[str, str]:
    """A pull worker's environment: its own home, its token, and no Redis at all."""
    env = {k: v for k, v in base.items() if not k.startswith("SHEEPDOG_")}
    env.update(SHEEPDOG_HOME=str(home), SHEEPDOG_WORKER_TOKEN=token, PYTHONUNBUFFERED="1")
    return env


def start_worker(service_url: str, env: dict[str, str], *args: str, ca: Path | None = None,
                 netns: str | None = None) -> subprocess.Popen:
    """A pull worker whose output goes to a file (a pipe nobody reads would fill and
    stop it): `kill` returns what it said."""
    argv = [*SHEEPDOG, "worker", "--server", service_url, *args]
    if ca is not None:
        argv += ["--ca-file", str(ca)]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = tempfile.NamedTemporaryFile("w+", prefix="pull-worker-", suffix=".log", delete=False)
    proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    proc.log_path = out.name  # type: ignore[attr-defined]
    out.close()
    return proc


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> str:
    """Signal the process group (if it still runs), wait, and return what it said."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    path = Path(getattr(proc, "log_path", "") or "/nonexistent")
    said = path.read_text() if path.is_file() else ""
    path.unlink(missing_ok=True)
    return said


@contextmanager
def network_namespace(host_ip: str, ns_ip: str) -> Iterator[str]:
    """A network namespace joined to this one by a veth pair: from inside, the only
    address there is is host_ip (its own loopback holds nothing of ours)."""
    name = f"sd{uuid.uuid4().hex[:6]}"
    outside, inside = f"vh-{name}", f"vn-{name}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", name)
        ip("addr", "add", f"{host_ip}/30", "dev", outside)
        ip("link", "set", outside, "up")
        ip("netns", "exec", name, "ip", "addr", "add", f"{ns_ip}/30", "dev", inside)
        ip("netns", "exec", name, "ip", "link", "set", inside, "up")
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
