"""A pull worker's side of the HTTP protocol: requests with back-off, files by hash.

Transient trouble (the service restarting, a dropped connection, 502-504) is waited
out with back-off; what waiting cannot fix (a refused token, another protocol, a
certificate that does not verify, a server that is not sheepdog) raises at once
with what to do about it.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import requests
import requests.adapters

from .cache import Cache
from .defaults import (
    PULL_BACKOFF_MAX,
    PULL_CHUNK,
    PULL_CONNECTIONS,
    PULL_HEADER,
    PULL_PROTOCOL,
    PULL_SEGMENT,
)
from .errors import ConfigError, SheepdogError

log = logging.getLogger(__name__)
SERVER_ERRORS_TRIED = 5  # a 500 (a bug) is tried this often, not forever


class Fatal(SheepdogError):
    """Waiting will not help: the worker says why and exits."""

    exit_code = 3


class Gone(SheepdogError):
    """The service no longer lets this worker hold the piece (cancelled, run elsewhere)."""


class Unreachable(SheepdogError):
    """The service did not answer within the time a request may wait."""


class HashMismatch(SheepdogError):
    """An upload arrived other than sent (the service checked its hash)."""


class _Segment:
    """`length` bytes of a file from its current position, for a streamed request body."""

    def __init__(self, f: IO[bytes], length: int) -> None:
        self.f, self.left = f, length

    def __len__(self) -> int:
        return self.left

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


def _unverified(error: Exception) -> bool:
    """A certificate that does not verify (not fixed by waiting), as opposed to a TLS
    connection cut midway (an EOF, a reset: tried again like any dropped connection)."""
    text = str(error)
    return any(word in text for word in ("CERTIFICATE_VERIFY_FAILED", "certificate verify",
                                         "doesn't match", "hostname mismatch",
                                         "WRONG_VERSION_NUMBER"))


def _error_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("error", ""))[:300]
    except ValueError:
        return response.text[:120].strip()


class Client:
    """The service at `server`, as a worker holding `token` sees it."""

    def __init__(self, server: str, token: str, ca_file: str | None = None,
                 say: Callable[[str], None] = log.warning) -> None:
        if not server.startswith(("https://", "http://")):
            raise ConfigError(f"--server {server!r}: give the service's URL, "
                              "like https://sheepdog.example.org")
        if not token:
            raise ConfigError("--token (or SHEEPDOG_WORKER_TOKEN) is needed: a token with "
                              "the worker role, from `sheepdog tokens add --role worker`")
        if ca_file and not Path(ca_file).is_file():
            raise ConfigError(f"--ca-file {ca_file}: no such file")
        self.server = server.rstrip("/")
        self.token = token
        self.verify: str | bool = ca_file or True
        self.say = say
        self._local = threading.local()
        # one pool of connections for every thread's Session (urllib3's is thread-safe):
        # a piece runs on a thread of its own, and a Session of its own each would make a
        # TLS connection, handshake and all, for every piece
        self._adapter = requests.adapters.HTTPAdapter(pool_maxsize=PULL_CONNECTIONS)
        self.stopping = threading.Event()  # set: requests stop waiting out an outage

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:  # a Session per thread: they are not made to be shared
            session = requests.Session()
            session.headers.update({"Authorization": f"Bearer {self.token}",
                                    PULL_HEADER: str(PULL_PROTOCOL)})
            for scheme in ("https://", "http://"):
                session.mount(scheme, self._adapter)
            self._local.session = session
        return session

    def request(self, method: str, path: str, give_up_after: float | None = None,
                read_timeout: float = 60.0, **kw: Any) -> requests.Response:
        """One request, tried again with back-off through outages (for ever, or until
        `give_up_after` seconds: then Unreachable); Fatal when waiting cannot help."""
        url = self.server + path
        started, pause, said, server_errors = time.monotonic(), 0.2, False, 0
        while True:
            response: requests.Response | None
            try:
                # verify given each time: a session's own is overridden by REQUESTS_CA_BUNDLE
                answer = self._session().request(method, url, timeout=(10, read_timeout),
                                                 verify=self.verify, **kw)
            except requests.exceptions.SSLError as e:
                if _unverified(e):
                    raise Fatal(f"cannot verify the certificate of {self.server} ({e}). If "
                                "the service uses a certificate from its own CA, give that "
                                "CA: --ca-file CA.pem (or SHEEPDOG_CA_FILE)") from e
                problem = f"{self.server}: TLS connection broken ({e})"  # a cut connection
                response = None
            except (requests.ConnectionError, requests.Timeout) as e:
                problem = f"{self.server} is unreachable ({type(e).__name__})"
                response = None
            else:
                response = answer
                self._refusals(answer)
                if answer.status_code not in (500, 502, 503, 504):
                    if said:
                        self.say(f"{self.server} answers again")
                    return answer
                server_errors += answer.status_code == 500
                if server_errors >= SERVER_ERRORS_TRIED:
                    raise SheepdogError(f"{method} {path}: {self.server} keeps failing "
                                        f"(500: {_error_text(answer)})")
                problem = f"{self.server} answered {answer.status_code} " \
                          f"({_error_text(answer)})"
            waited = time.monotonic() - started
            if self.stopping.is_set() or (give_up_after is not None and waited > give_up_after):
                raise Unreachable(f"{method} {path}: {problem}")
            if not said:
                self.say(f"{problem}; trying again with back-off")
                said = True
            retry_after = response.headers.get("Retry-After", "") if response is not None else ""
            wait = float(retry_after) if retry_after.isdigit() else pause
            self.stopping.wait(min(wait, PULL_BACKOFF_MAX))
            pause = min(pause * 2, PULL_BACKOFF_MAX)

    def _refusals(self, response: requests.Response) -> None:
        code = response.status_code
        if code == 401:
            raise Fatal(f"{self.server} refused the worker token (401: "
                        f"{_error_text(response)}): it is wrong or was revoked; ask the "
                        "service's admin for one (sheepdog tokens add --role worker)")
        if code == 403:
            raise Fatal(f"{self.server} refused this token ({_error_text(response)}); a "
                        "pull worker needs a token with the worker role")
        if code == 426:
            raise Fatal(_error_text(response))

    def json(self, method: str, path: str, give_up_after: float | None = None,
             read_timeout: float = 60.0, ok: tuple[int, ...] = (200,),
             **kw: Any) -> dict[str, Any]:
        response = self.request(method, path, give_up_after, read_timeout, **kw)
        if response.status_code == 410:
            raise Gone(_error_text(response))
        if response.status_code not in ok:
            raise SheepdogError(f"{method} {path}: {response.status_code} "
                                f"{_error_text(response)}")
        body: dict[str, Any] = response.json()
        return body

    # -- the protocol
    def hello(self) -> dict[str, Any]:
        """Check the service is sheepdog and speaks this protocol; its settings."""
        response = self.request("GET", "/api/v1/worker/hello", give_up_after=60)
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code != 426 and (
                not isinstance(body, dict) or body.get("service") != "sheepdog"):
            kind = response.headers.get("Content-Type", "?").split(";")[0]
            raise Fatal(f"{self.server} is not a sheepdog service (GET /api/v1/worker/hello "
                        f"answered {response.status_code} {kind})")
        assert isinstance(body, dict)
        if body.get("protocol") != PULL_PROTOCOL:
            raise Fatal(f"{self.server} speaks sheepdog worker protocol {body.get('protocol')}; "
                        f"this worker speaks protocol {PULL_PROTOCOL}: run the same sheepdog "
                        "version on both")
        return body

    def download(self, sha: str, worker: str, lease: str, cache: Cache,
                 give_up_after: float) -> Path:
        """A blob into the cache, resuming a cut transfer where it stopped; its hash is
        checked before it is stored."""
        tmp = cache.tmp / f"dl.{sha}.{uuid.uuid4().hex[:8]}"
        path = f"/api/v1/worker/blobs/{sha}"
        started = time.monotonic()
        try:
            for _ in range(3):  # a wrong hash is fetched again, twice
                digest = hashlib.sha256()
                with open(tmp, "wb") as f:
                    while True:
                        have = f.tell()
                        headers = {"Range": f"bytes={have}-"} if have else {}
                        response = self.request("GET", path, give_up_after, stream=True,
                                                headers=headers,
                                                params={"worker": worker, "lease": lease})
                        if response.status_code == 410:
                            raise Gone(_error_text(response))
                        if response.status_code not in (200, 206):
                            raise SheepdogError(f"fetching {sha[:12]}: {response.status_code} "
                                                f"{_error_text(response)}")
                        if response.status_code == 200 and have:
                            f.seek(0)
                            f.truncate()
                            digest = hashlib.sha256()
                        try:
                            for chunk in response.iter_content(PULL_CHUNK):
                                f.write(chunk)
                                digest.update(chunk)
                            break
                        except (requests.ConnectionError, requests.Timeout) as e:
                            if time.monotonic() - started > give_up_after:
                                raise Unreachable(f"fetching {sha[:12]}: {e}") from e
                            continue  # resume at what arrived
                if digest.hexdigest() == sha:
                    return cache.put_blob_file(tmp, sha)
                self.say(f"blob {sha[:12]} arrived damaged; fetching it again")
            raise SheepdogError(f"blob {sha[:12]} kept arriving with another hash")
        finally:
            tmp.unlink(missing_ok=True)

    def upload(self, path: Path, sha: str, worker: str, lease: str,
               give_up_after: float, ask_first: bool = True) -> None:
        """A file to the service by its hash, in segments; a cut segment resumes at the
        byte the service has. HashMismatch if the service got other bytes. Without
        `ask_first` it starts sending at once (a small file: asking costs more)."""
        size = path.stat().st_size
        where = f"/api/v1/worker/uploads/{sha}"
        params = {"worker": worker, "lease": lease}
        state: dict[str, Any] = {"complete": False, "offset": 0} if not ask_first else \
            self.json("GET", where, give_up_after, params=params)
        while not state["complete"]:
            offset = int(state["offset"])
            length = min(PULL_SEGMENT, size - offset)
            with open(path, "rb") as f:
                f.seek(offset)
                try:
                    response = self._session().put(
                        self.server + where, params=params, data=_Segment(f, length),
                        headers={"Upload-Offset": str(offset), "Upload-Length": str(size),
                                 "Content-Length": str(length),
                                 "Content-Type": "application/octet-stream"},
                        timeout=(10, 300), verify=self.verify)
                except requests.exceptions.SSLError as e:
                    if _unverified(e):
                        raise Fatal(f"cannot verify the certificate of {self.server}: "
                                    f"{e}") from e
                    state = self.json("GET", where, give_up_after, params=params)
                    continue  # a cut TLS connection: resume where the service's copy ends
                except (requests.ConnectionError, requests.Timeout):
                    state = self.json("GET", where, give_up_after, params=params)
                    continue  # resume where the service's copy ends
            self._refusals(response)
            if response.status_code == 422:
                raise HashMismatch(_error_text(response))
            if response.status_code == 410:
                raise Gone(_error_text(response))
            if response.status_code in (201, 202):
                state = response.json()
            else:  # 409 (another offset), 5xx: ask where it stands
                self.stopping.wait(0.5)
                state = self.json("GET", where, give_up_after, params=params)
