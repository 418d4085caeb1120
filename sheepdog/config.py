"""Settings from the environment and an optional TOML file; nothing else reads os.environ."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def data_dir() -> Path:
    """Where this user's embedded Redis, cache store and scratch space live."""
    explicit = os.environ.get("SHEEPDOG_HOME")
    return Path(explicit) if explicit else _xdg("XDG_DATA_HOME", ".local/share") / "sheepdog"


def config_file() -> Path:
    explicit = os.environ.get("SHEEPDOG_CONFIG")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CONFIG_HOME", ".config") / "sheepdog/config.toml"


@dataclass(frozen=True)
class Settings:
    """Everything tunable; each field has an env variable SHEEPDOG_<FIELD>."""

    redis_url: str | None = None
    home: Path = field(default_factory=data_dir)
    log_max_lines: int = 200_000
    log_max_bytes: int = 256 << 20  # a job's log text, at most (then one truncation marker)
    log_buffer_lines: int = 100_000  # a piece's lines kept while Redis is unreachable
    heartbeat_timeout: float = 20.0  # a SIGKILLed remote worker's piece reruns within ~25 s
    max_attempts: int = 3
    queue: str = "default"
    backend: str = "local"  # where pieces run when a command does not say (gemma-wrapper's)
    host: str = ""  # the host for that backend
    api_tokens: tuple[str, ...] = ()  # legacy tokens: every role
    tokens_file: str = ""  # tokens with roles (default: tokens.json beside the config)
    lease_timeout: float = 20.0  # s: a pull worker's piece runs again this long after it went
    redis_ca: str = ""  # CA file that signs a rediss:// server's certificate
    redis_cert: str = ""  # client certificate for rediss:// (with redis_key)
    redis_key: str = ""
    cors_origins: tuple[str, ...] = ()
    # proxies in front of `serve` whose X-Forwarded-For/-Proto/-Host it believes (nginx: 1):
    # then a page's cookie is Secure when the browser came by HTTPS
    trusted_proxies: int = 0
    retention_days: float = 30.0  # finished jobs and their logs stay in Redis this long
    upload_limit_mb: int = 512  # one POST /jobs request with its uploads
    json_limit_mb: int = 16  # its JSON job description (and any JSON body of a worker's)
    worker_upload_mb: int = 8192  # one output file a pull worker uploads
    bundle_max_mb: int = 4096  # a bundle's members, unpacked, together
    bundle_member_max_mb: int = 2048  # one member, unpacked
    bundle_max_members: int = 1000  # members of one bundle
    input_roots: tuple[str, ...] = ()
    inventory: str | None = None
    max_streams_per_job: int = 128  # open websocket streams of one job
    max_streams_per_token: int = 256  # ... of one token (each a greenlet and a Redis link)
    max_permutations: int = 100_000  # one gemma-permute request, at most
    max_pieces: int = 5_000  # permutation batches of one request, at most
    max_chromosomes: int = 100  # in one genotype set
    prepare_workers: int = 2  # POST /jobs bodies validated and split at once (processes)
    prepare_memory_mb: int = 2048  # ... each in at most this much memory
    prepare_seconds: float = 120.0  # ... and this much CPU time
    allow_any_queue: bool = False  # POST /jobs may name a queue no worker has served yet
    max_command_args: int = 10_000  # a command's words, at most
    max_command_bytes: int = 1 << 20  # a command's bytes, at most (the OS allows ~2 MiB)
    gn3_max_attempts: int = 1  # GN3's commands have side effects: run once unless allowed
    gn3_incomplete_wait: float = 30.0  # s: how long a GN3 id may wait for its hash fields
    gn3_routes_open: bool = False  # GN3's two status routes answer without a token, as GN3's
    scratch_max_age: float = 2 * 24 * 3600.0  # s: abandoned scratch older than this is swept
    # a CWL tool that asks for a container (DockerRequirement): "host" does as cwltool's
    # --no-container (a hint's tool runs from the host, a requirement is refused),
    # "refuse" refuses both (exit 33, unsupported)
    cwl_containers: str = "host"
    # the fewest invocations of one CWL tool, ready at once, that go as one piece built on
    # the worker (a scatter's elements in chunks); fewer each go as their own piece; 0: never
    cwl_batch: int = 100

    @property
    def heartbeat_interval(self) -> float:
        """How often a running task proves it is alive: several beats per timeout."""
        return max(0.2, min(10.0, self.heartbeat_timeout / 4))

    @property
    def cache_dir(self) -> Path:
        """The content-addressed cache (cache.Cache) of this user's data directory."""
        return self.home / "store"

    @property
    def jobs_dir(self) -> Path:
        """Where a job keeps files of its own (`jobs_dir / <job id>`: a CWL run's
        documents and results); removed when the job leaves Redis (retention)."""
        return self.home / "jobs"


_INT = {"log_max_lines", "log_max_bytes", "log_buffer_lines", "max_attempts", "upload_limit_mb",
        "json_limit_mb", "worker_upload_mb", "trusted_proxies", "bundle_max_mb",
        "bundle_member_max_mb", "bundle_max_members",
        "gn3_max_attempts", "max_command_args", "max_command_bytes", "max_streams_per_job",
        "max_streams_per_token", "max_permutations", "max_pieces", "max_chromosomes",
        "prepare_workers", "prepare_memory_mb", "cwl_batch"}
_FLOAT = {"retention_days", "heartbeat_timeout", "lease_timeout", "scratch_max_age",
          "gn3_incomplete_wait", "prepare_seconds"}
_BOOL = {"gn3_routes_open", "allow_any_queue"}
_LIST = {"api_tokens", "cors_origins", "input_roots"}


def _convert(name: str, raw: object, source: str) -> object:
    try:
        if name in _INT:
            return int(str(raw))
        if name in _FLOAT:
            return float(str(raw))
    except ValueError as e:
        raise ConfigError(f"{source}: {name} must be a number, got {raw!r}") from e
    if name in _BOOL:
        if isinstance(raw, bool):
            return raw
        if str(raw).lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return str(raw).lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{source}: {name} must be true or false, got {raw!r}")
    if name in _LIST:
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(str(i).strip() for i in items if str(i).strip())
    if name == "home":
        return Path(str(raw))
    if name == "cwl_containers" and str(raw) not in ("host", "refuse"):
        raise ConfigError(f"{source}: {name} must be host or refuse, got {raw!r}")
    return str(raw)


def load(**overrides: object) -> Settings:
    """Settings from the config file, then SHEEPDOG_* variables, then explicit overrides."""
    values: dict[str, object] = {}
    names = set(Settings.__dataclass_fields__)
    path = config_file()
    if path.is_file():
        import tomllib  # only then: every short command reads settings, few have a file

        try:
            table = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        for key, raw in table.items():
            if key not in names:
                raise ConfigError(f"{path}: unknown setting {key!r}")
            values[key] = _convert(key, raw, str(path))
    for name in names:
        raw = os.environ.get(f"SHEEPDOG_{name.upper()}")
        if raw is not None and raw != "":
            values[name] = _convert(name, raw, f"SHEEPDOG_{name.upper()}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)  # type: ignore[arg-type]
