"""A test CA and certificates made by `openssl` (for Redis over TLS and HTTPS)."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA's certificate: what clients trust
    server_cert: Path  # for 127.0.0.1 and localhost
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these: verification must fail with it


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(where: Path, name: str) -> tuple[Path, Path]:
    key, cert = where / f"{name}.key", where / f"{name}.crt"
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
         f"/CN=sheepdog test {name}", "-keyout", key.name, "-out", cert.name, cwd=where)
    return cert, key


def _signed(where: Path, name: str, ca: tuple[Path, Path], san: str) -> tuple[Path, Path]:
    key, csr, cert = where / f"{name}.key", where / f"{name}.csr", where / f"{name}.crt"
    ext = where / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n")
    _run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", key.name,
         "-out", csr.name, cwd=where)
    _run("x509", "-req", "-in", csr.name, "-CA", ca[0].name, "-CAkey", ca[1].name,
         "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", cert.name, cwd=where)
    return cert, key


def make(where: Path, more_ips: tuple[str, ...] = ()) -> Certs:
    assert shutil.which("openssl"), "openssl is not installed"
    where.mkdir(parents=True, exist_ok=True)
    ca = _ca(where, "ca")
    other = _ca(where, "other-ca")
    ips = "".join(f",IP:{ip}" for ip in more_ips)
    server = _signed(where, "server", ca, f"IP:127.0.0.1,DNS:localhost{ips}")
    client = _signed(where, "client", ca, "DNS:sheepdog-client")
    for key in (server[1], client[1]):
        key.chmod(0o600)
    return Certs(ca[0], server[0], server[1], client[0], client[1], other[0])
