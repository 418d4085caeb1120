"""Hosts: a name resolved through ~/.ssh/config, plus sheepdog's own per-host settings.

The inventory (TOML, SHEEPDOG_INVENTORY or ~/.config/sheepdog/hosts.toml) adds what ssh
does not know:

    [hosts.octopus]
    workdir = "/export/sheepdog"     # where the cache and scratch live on the host
    backend = "slurm"                # default backend for this host
    partition = "compute"            # the backend's own settings (here Slurm's partition
    account = "genenetwork"          #   and account): see that backend's settings class
    guix_profile = "/gnu/var/sheepdog/profile"   # commands run inside this profile
    allow_without_guix = false       # run even when the host has no Guix
    [hosts.octopus.env]              # set for every piece run there, e.g. the CPU
    OPENBLAS_CORETYPE = "Haswell"    # kernel the host's OpenBLAS must use
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import paramiko

from .errors import ConfigError


@dataclass(frozen=True)
class Host:
    """Everything needed to reach and use one host."""

    name: str
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: tuple[str, ...] = ()
    known_hosts: tuple[str, ...] = ()
    proxy_jump: str = ""
    workdir: str = ""
    backend: str = "shell"
    guix_profile: str = ""
    allow_without_guix: bool = False
    env: dict[str, str] = field(default_factory=dict)
    # the rest of the host's inventory table: settings of its backend, which reads them
    options: dict[str, object] = field(default_factory=dict)


# inventory keys that are the Host's own; every other key belongs to the host's backend
_HOST_KEYS = {"hostname", "port", "user", "workdir", "backend", "guix_profile",
              "allow_without_guix", "env"}


def ssh_config_path() -> Path:
    return Path(os.environ.get("SHEEPDOG_SSH_CONFIG", Path.home() / ".ssh" / "config"))


def inventory_path(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sheepdog" / "hosts.toml"


def _inventory(path: Path) -> dict[str, dict[str, object]]:
    if not path.is_file():
        return {}
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from e
    hosts = table.get("hosts", {})
    if not isinstance(hosts, dict):
        raise ConfigError(f"{path}: [hosts] must be a table of host tables")
    return hosts


def known_host_names(inventory: str | None = None) -> list[str]:
    names = set(_inventory(inventory_path(inventory)))
    config = ssh_config_path()
    if config.is_file():
        names |= {h for h in paramiko.SSHConfig.from_path(str(config)).get_hostnames()
                  if "*" not in h and "?" not in h}
    return sorted(names)


def _env_table(raw: object, name: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"[hosts.{name}.env] must be a table of NAME = \"value\"")
    return {str(k): str(v) for k, v in raw.items()}


def _ssh_config(name: str) -> tuple[Path, dict[str, object]]:
    """The ssh config's file and its settings for `name` (empty if no config)."""
    config_path = ssh_config_path()
    if not config_path.is_file():
        return config_path, {}
    return config_path, dict(paramiko.SSHConfig.from_path(str(config_path)).lookup(name))


def _first(*values: object, default: object) -> str:
    """The first value given (the inventory's, then ssh config's), as text."""
    return str(next((v for v in values if v), default))


def resolve(name: str, inventory: str | None = None) -> Host:
    """The host called `name`; ConfigError says how to define it when it is unknown."""
    if not name or any(c in name for c in " \t\n;'\"`$"):
        raise ConfigError(f"{name!r} is not a host name")
    settings = _inventory(inventory_path(inventory)).get(name, {})
    config_path, cfg = _ssh_config(name)
    if settings == {} and cfg.get("hostname", name) == name and name not in known_host_names(
            inventory):
        raise ConfigError(f"unknown host {name!r}: add a 'Host {name}' entry to "
                          f"{config_path} or a [hosts.{name}] table to "
                          f"{inventory_path(inventory)}")
    known = cfg.get("userknownhostsfile") or str(Path.home() / ".ssh" / "known_hosts")
    identities: list[object] = list(cfg.get("identityfile") or [])  # type: ignore[call-overload]
    return Host(
        name=name,
        hostname=_first(settings.get("hostname"), cfg.get("hostname"), default=name),
        port=int(_first(settings.get("port"), cfg.get("port"), default=22)),
        user=_first(settings.get("user"), cfg.get("user"), default=os.environ.get("USER",
                                                                                  "root")),
        identity_files=tuple(os.path.expanduser(str(i)) for i in identities),
        known_hosts=tuple(os.path.expanduser(k) for k in str(known).split()),
        proxy_jump=_first(cfg.get("proxyjump"), default=""),
        workdir=_first(settings.get("workdir"), default=""),
        backend=_first(settings.get("backend"), default="shell"),
        guix_profile=_first(settings.get("guix_profile"), default=""),
        allow_without_guix=bool(settings.get("allow_without_guix", False)),
        env=_env_table(settings.get("env"), name),
        options={k: v for k, v in settings.items() if k not in _HOST_KEYS},
    )
