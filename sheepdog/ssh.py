"""One verified, reused ssh connection per host (paramiko), and running commands on it.

Host keys are checked against the host's known_hosts files: an unknown key is refused
with the command that accepts it, never accepted silently. Connections are compressed
and kept alive, so a dead link is noticed within seconds.
"""

from __future__ import annotations

import shlex
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import paramiko

from .defaults import (
    REMOTE_COMMAND_TIMEOUT,
    SSH_CONNECT_TIMEOUT,
    SSH_EOF_GRACE,
    SSH_EOF_POLL,
    SSH_KEEPALIVE,
    SSH_READ_POLL,
)
from .errors import BackendError
from .hosts import Host, resolve

KEEPALIVE = SSH_KEEPALIVE
COMMAND_TIMEOUT = REMOTE_COMMAND_TIMEOUT
_pool: dict[str, Connection] = {}
_pool_lock = threading.Lock()


def quote(argv: Sequence[str]) -> str:
    """A command line for a remote POSIX shell: every word quoted."""
    return shlex.join([str(a) for a in argv])


class Connection:
    """A connected paramiko client for one host."""

    def __init__(self, host: Host, timeout: float = SSH_CONNECT_TIMEOUT) -> None:
        self.host = host
        self.timeout = timeout
        self.client = self._connect()

    def _proxy(self) -> paramiko.Channel | None:
        if not self.host.proxy_jump:
            return None
        hops = [h.strip() for h in self.host.proxy_jump.split(",") if h.strip()]
        if len(hops) > 1:  # taking only one of them would silently skip a hop
            raise BackendError(
                f"ProxyJump {self.host.proxy_jump} has {len(hops)} hops, which sheepdog does "
                f"not chain: give Host {hops[-1]} its own 'ProxyJump {','.join(hops[:-1])}' "
                f"in ~/.ssh/config and use 'ProxyJump {hops[-1]}' here", self.host.name)
        jump = get(resolve(hops[0]))
        try:
            return jump.transport.open_channel("direct-tcpip", (self.host.hostname, self.host.port),
                                               ("127.0.0.1", 0), timeout=self.timeout)
        except (paramiko.SSHException, OSError) as e:
            raise BackendError(f"jump host {self.host.proxy_jump} cannot reach "
                               f"{self.host.hostname}:{self.host.port}: {e}", self.host.name) from e

    def _connect(self) -> paramiko.SSHClient:
        h = self.host
        client = paramiko.SSHClient()
        for known in h.known_hosts:
            if Path(known).is_file():
                client.load_host_keys(known)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        where = f"{h.hostname}:{h.port}"
        try:
            client.connect(h.hostname, port=h.port, username=h.user or None,
                           key_filename=list(h.identity_files) or None, timeout=self.timeout,
                           banner_timeout=self.timeout, auth_timeout=self.timeout,
                           compress=True, sock=self._proxy(), allow_agent=False)
        except paramiko.BadHostKeyException as e:
            raise BackendError(
                f"the host key of {where} has CHANGED and is refused; if that is expected, "
                f"remove the old one with: ssh-keygen -R '[{h.hostname}]:{h.port}'",
                h.name) from e
        except paramiko.AuthenticationException as e:
            raise BackendError(f"authentication as {h.user} on {where} failed; check the "
                               f"IdentityFile for Host {h.name} in ~/.ssh/config", h.name) from e
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise BackendError(
                    f"the host key of {where} is not known, so it is refused; check it and "
                    f"accept it with: ssh-keyscan -p {h.port} {h.hostname} >> "
                    f"{h.known_hosts[0] if h.known_hosts else '~/.ssh/known_hosts'}",
                    h.name) from e
            raise BackendError(f"ssh to {where} failed: {e}", h.name) from e
        except (TimeoutError, OSError) as e:
            raise BackendError(f"cannot reach {where} ({e.strerror or e}); is the host up "
                               "and sshd listening?", h.name) from e
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE)
        return client

    @property
    def transport(self) -> paramiko.Transport:
        transport = self.client.get_transport()
        if transport is None or not transport.is_active():
            raise BackendError("the ssh connection was lost", self.host.name)
        return transport

    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def start(self, command: str) -> paramiko.Channel:
        """Start a remote command; read its channel for output and exit status."""
        try:
            channel = self.transport.open_session(timeout=self.timeout)
            channel.exec_command(command)
        except (paramiko.SSHException, OSError) as e:
            raise BackendError(f"cannot start a command: {e}", self.host.name) from e
        return channel

    def run(self, command: str, timeout: float = COMMAND_TIMEOUT,
            on_line: Callable[[str, str], None] | None = None) -> tuple[int, str, str]:
        """Run to the end: (exit code, stdout, stderr), read until EOF."""
        channel = self.start(command)
        channel.settimeout(timeout)
        out, err = bytearray(), bytearray()
        # sshd may send the exit status before the last of the output (it reports the
        # child's exit while still draining its pipes), so read on until EOF; a command
        # whose background child keeps its output open gets SSH_EOF_GRACE after its exit
        eof_by: float | None = None
        try:
            while True:
                if channel.recv_ready():
                    out += channel.recv(65536)
                elif channel.recv_stderr_ready():
                    err += channel.recv_stderr(65536)
                elif channel.exit_status_ready():
                    if channel.eof_received or channel.closed:
                        break
                    eof_by = eof_by or time.monotonic() + SSH_EOF_GRACE
                    if time.monotonic() > eof_by:
                        break
                    time.sleep(SSH_EOF_POLL)
                elif not self.alive():
                    raise BackendError("the ssh connection was lost", self.host.name)
                else:
                    channel.status_event.wait(SSH_READ_POLL)
            code = channel.recv_exit_status()
        except TimeoutError as e:
            channel.close()
            raise BackendError(f"{command[:60]!r} did not finish within {timeout:g}s",
                               self.host.name) from e
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def open_sftp(self) -> paramiko.SFTPClient:
        """A new SFTP session on this connection (one per user: sessions are not shared
        between threads)."""
        try:
            return self.client.open_sftp()
        except (paramiko.SSHException, OSError) as e:
            raise BackendError(f"cannot open sftp: {e}", self.host.name) from e

    def close(self) -> None:
        self.client.close()


def get(host: Host) -> Connection:
    """The shared connection to a host, (re)connected when needed."""
    with _pool_lock:
        existing = _pool.get(host.name)
        if existing is not None and existing.alive():
            return existing
    fresh = Connection(host)
    with _pool_lock:
        _pool[host.name] = fresh
    return fresh


def drop(host: Host) -> None:
    with _pool_lock:
        conn = _pool.pop(host.name, None)
    if conn is not None:
        conn.close()
