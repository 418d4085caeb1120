"""The one exception tree: every error sheepdog raises on purpose is a SheepdogError."""

from __future__ import annotations

from .defaults import MAX_QUOTED


class SheepdogError(Exception):
    """Root of every error sheepdog raises; its text is meant for the user as is.

    `exit_code` is what the command line exits with, `http_status` what the web
    service answers: both live on the error, so no caller maps class names.
    """

    exit_code = 1
    http_status = 400


class ConfigError(SheepdogError):
    """A setting or a command-line value is unusable."""

    exit_code = 2


class RedisUnavailable(SheepdogError):
    """The Redis server named by the settings cannot be reached."""

    exit_code = 2
    http_status = 503

    def __init__(self, url: str, reason: str, transient: bool = True) -> None:
        super().__init__(f"cannot reach Redis at {url}: {reason}")
        self.url = url
        self.transient = transient  # down (worth waiting for), not a wrong URL


class UnknownJob(SheepdogError):
    """No job has this id."""

    exit_code = 2
    http_status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"unknown job id {job_id!r} (see 'sheepdog list')")
        self.job_id = job_id


class JobEnded(SheepdogError):
    """The job has ended (failed or cancelled): it takes no more tasks."""

    http_status = 409

    def __init__(self, job_id: str, status: str) -> None:
        super().__init__(f"job {job_id} has ended ({status}); it takes no more tasks")
        self.job_id, self.status = job_id, status


class InputError(SheepdogError):
    """A user's input file or field is wrong; names the file, line and problem."""

    exit_code = 2

    def __init__(self, where: str, problem: str, line: int | None = None) -> None:
        if len(problem) > MAX_QUOTED:  # a value quoted from a 200 MB line stays short
            problem = problem[:MAX_QUOTED] + f"… ({len(problem):,d} characters)"
        place = f"{where}, line {line}" if line is not None else where
        super().__init__(f"{place}: {problem}")
        self.where = where
        self.line = line
        self.problem = problem


class BackendError(SheepdogError):
    """A backend could not start, watch or stop a task."""

    http_status = 502

    def __init__(self, message: str, host: str | None = None) -> None:
        super().__init__(f"{host}: {message}" if host else message)
        self.host = host


class GatherError(SheepdogError):
    """The pieces of a scatter-gather job disagree; names the piece and the field."""

    http_status = 422


class FieldError(SheepdogError):
    """A field of a request (a REST body, a CLI option) is wrong; names the field."""

    exit_code = 2

    def __init__(self, field: str, problem: str, http_status: int = 400) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
        self.http_status = http_status


class DiskFull(SheepdogError):
    """A directory of sheepdog's own has no space left; names it (never the input)."""

    http_status = 507  # Insufficient Storage

    def __init__(self, directory: str, doing: str = "") -> None:
        super().__init__(f"no space left on the device holding {directory}"
                         + (f" (while {doing})" if doing else "")
                         + ": free space there, or point SHEEPDOG_HOME elsewhere")
        self.directory = directory


NO_SPACE = frozenset({28, 122})  # ENOSPC, EDQUOT


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE
