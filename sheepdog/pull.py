"""A worker that reaches nothing but the web service: it pulls pieces over HTTPS.

It long-polls for pieces (one request per ~30 s when idle), fetches each piece's inputs
by hash into its own content-addressed cache (once, however many pieces use them),
runs the piece exactly as a Redis worker does (piece.run), streams its output back in
batches, renews its leases (the answer tells it of cancels), uploads the outputs by
hash and reports the end. Killed, its pieces run again elsewhere once their leases
expire; told to stop, it hands them back at once.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

from . import piece
from .cache import Cache
from .config import Settings
from .defaults import LOG_BATCH_LINES, PULL_CLAIM_WAIT, PULL_RENEW_EVERY
from .errors import SheepdogError
from .models import Task
from .piece import RELEASED, Outcome, PieceOutput
from .pullclient import Client, Fatal, Gone, HashMismatch, Unreachable

log = logging.getLogger(__name__)
LINES_PER_REQUEST = 10 * LOG_BATCH_LINES
UPLOAD_TRIES = 3  # an upload refused for its hash is sent again this often, then the piece reruns


class HttpLog:
    """A piece's output lines (and exact bytes, if it captures) sent in batches: at each
    flush (the watch loop flushes every fraction of a second). Lines wait through an
    outage, up to the log buffer; past that the log is not whole (`lost`)."""

    def __init__(self, client: Client, worker: str, lease: str, revoked: threading.Event,
                 buffer_lines: int) -> None:
        self.client, self.worker, self.lease, self.revoked = client, worker, lease, revoked
        self.buffer = buffer_lines
        self.lost = ""
        self._lines: list[list[str]] = []
        self._raw: dict[str, bytearray] = {}
        self._lock = threading.Lock()
        self._sending = threading.Lock()

    def write(self, stream: str, lines: list[str]) -> None:
        with self._lock:
            if self.lost:
                return
            self._lines += [[stream, line] for line in lines]
            if len(self._lines) > self.buffer:
                self.lost = (f"its output could not be sent: {len(self._lines)} lines waited "
                             f"for {self.client.server}")
                self._lines = []

    def append(self, stream: str, chunk: bytes) -> None:
        with self._lock:
            self._raw.setdefault(stream, bytearray()).extend(chunk)

    def flush(self, give_up_after: float = 0.0) -> None:
        """Send what waits; one try (lines are kept for the next) unless
        `give_up_after` allows retrying that long."""
        with self._sending:
            while True:
                with self._lock:
                    lines, self._lines = self._lines[:LINES_PER_REQUEST], \
                        self._lines[LINES_PER_REQUEST:]
                    raw, self._raw = self._raw, {}
                if not lines and not raw:
                    return
                body = {"worker": self.worker, "lease": self.lease, "lines": lines,
                        "raw": {s: base64.b64encode(bytes(d)).decode() for s, d in raw.items()}}
                try:
                    self.client.json("POST", "/api/v1/worker/log", give_up_after, json=body)
                except Gone:
                    self.revoked.set()
                    return
                except (Unreachable, SheepdogError) as e:
                    if isinstance(e, Fatal):
                        raise
                    with self._lock:  # kept, in order, for the next flush
                        self._lines = lines + self._lines
                        for s, d in raw.items():
                            self._raw[s] = d + self._raw.get(s, bytearray())
                    if give_up_after:
                        self.lost = f"its output could not be sent: {e}"
                    return


class PullWorker:
    """Pieces from the service's queues, `concurrency` at a time."""

    def __init__(self, client: Client, settings: Settings, queues: list[str],
                 concurrency: int = 1, name: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.queues = queues
        self.concurrency = max(1, concurrency)
        self.name = name or f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.host = socket.gethostname()
        self.cache = Cache(settings.cache_dir)
        self.full_name = ""  # the service's name for this worker (token name + ours)
        self.lease_seconds = settings.lease_timeout
        self.stopping = threading.Event()
        self.leaving = threading.Event()
        self.fatal: Fatal | None = None
        self._leases: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._renewing = threading.Event()  # set: the renew loop ends

    # -- lifecycle
    def run(self) -> None:
        """Work until stopped; Fatal if the service refuses this worker."""
        info = self.client.hello()
        self.lease_seconds = float(info.get("lease_seconds", self.lease_seconds))
        log.info("pull worker %s: %s (protocol %s, sheepdog %s), queues %s", self.name,
                 self.client.server, info.get("protocol"), info.get("version"),
                 ", ".join(self.queues))
        loops = [threading.Thread(target=self._claim_loop, name="claim", daemon=True),
                 threading.Thread(target=self._renew_loop, name="renew", daemon=True)]
        for t in loops:
            t.start()
        self.stopping.wait()
        if self.fatal is not None:
            self.client.stopping.set()  # refused: nothing more will be recorded
        with self._lock:
            pieces = list(self._threads)
        for t in pieces:  # each hands its piece back (or, refused, just stops it)
            t.join()
        self._renewing.set()
        self.client.stopping.set()
        for t in loops:
            t.join(2.0)  # a claim's long poll is cut off: its pieces' leases run out
        if self.fatal is not None:
            raise self.fatal

    def stop(self, release: bool = True) -> None:
        """Take no more pieces; `release`: hand the running ones back to the queue."""
        if release:
            self.leaving.set()
        self.stopping.set()

    def _die(self, error: Fatal) -> None:
        log.error("pull worker %s: %s", self.name, error)
        self.fatal = error
        self.leaving.set()
        self.stopping.set()

    def _claim_loop(self) -> None:
        while not self.stopping.is_set():
            with self._room:
                while len(self._leases) >= self.concurrency and not self.stopping.is_set():
                    self._room.wait(0.5)
                free = self.concurrency - len(self._leases)
            if self.stopping.is_set():
                return
            try:
                answer = self.client.json("POST", "/api/v1/worker/claim",
                                          read_timeout=PULL_CLAIM_WAIT + 30, json={
                                              "worker": self.name, "queues": self.queues,
                                              "slots": free, "wait": PULL_CLAIM_WAIT,
                                              "host": self.host})
            except Fatal as e:
                self._die(e)
                return
            except (Unreachable, SheepdogError) as e:
                if not self.stopping.is_set():
                    log.warning("pull worker %s: cannot claim work: %s", self.name, e)
                    self.stopping.wait(PULL_RENEW_EVERY)
                continue
            self.full_name = str(answer.get("worker", self.full_name))
            for found in answer.get("pieces", []):
                self._start(found)

    def _start(self, found: dict[str, Any]) -> None:
        lease = str(found["lease"])
        if self.leaving.is_set():  # came after the worker was told to go: hand it back
            self._report(Task(**found["task"]), lease, Outcome(None, RELEASED), PULL_RENEW_EVERY)
            return
        revoked = threading.Event()
        with self._lock:
            self._leases[lease] = revoked
            thread = threading.Thread(target=self._piece, args=(found, revoked),
                                      name=f"piece-{lease[:8]}", daemon=True)
            self._threads.append(thread)
        thread.start()

    def _renew_loop(self) -> None:
        while not self._renewing.wait(PULL_RENEW_EVERY):
            with self._lock:
                leases = dict(self._leases)
            if not leases:
                continue
            try:
                answer = self.client.json("POST", "/api/v1/worker/renew",
                                          give_up_after=PULL_RENEW_EVERY, json={
                                              "worker": self.name, "leases": list(leases),
                                              "queues": self.queues, "slots": self.concurrency,
                                              "host": self.host})
            except Fatal as e:
                self._die(e)
                return
            except (Unreachable, SheepdogError) as e:
                log.warning("pull worker %s: cannot renew leases yet: %s", self.name, e)
                continue  # the service may be restarting; a lease lasts much longer
            for lease in answer.get("revoked", []):
                if lease in leases:
                    leases[lease].set()

    # -- one piece
    def _piece(self, found: dict[str, Any], revoked: threading.Event) -> None:
        lease = str(found["lease"])
        try:
            self._run_piece(found, revoked)
        except Fatal as e:
            self._die(e)
        except Exception:  # keep serving; the lease expires and the piece runs elsewhere
            log.exception("pull worker %s: piece %s", self.name, lease[:12])
        finally:
            with self._room:
                self._leases.pop(lease, None)
                self._threads = [t for t in self._threads if t is not threading.current_thread()]
                self._room.notify_all()

    def _run_piece(self, found: dict[str, Any], revoked: threading.Event) -> None:
        task = Task(**found["task"])
        lease = str(found["lease"])
        patience = 2 * self.lease_seconds  # after that the lease is surely gone anyway
        scratch_cwd: Path | None = None
        if not task.cacheable and task.cwd and not Path(task.cwd).is_dir():
            scratch_cwd = self.cache.scratch(task.id)  # the service's directory is not here
            task.cwd = str(scratch_cwd)
        sink = HttpLog(self.client, self.name, lease, revoked, self.settings.log_buffer_lines)
        output = PieceOutput(sink, sink if task.capture else None)
        try:
            try:
                self._stage(task, found.get("deps", {}), lease, patience)
            except Gone:
                return
            except (Unreachable, SheepdogError, OSError) as e:
                if isinstance(e, Fatal):
                    raise
                self._report(task, lease, Outcome(None, f"could not fetch its inputs from "
                                                        f"{self.client.server}: {e}", lost=True),
                             patience)
                return
            outcome = piece.run(task, self.settings, self.cache, output, revoked, self.leaving)
            sink.flush(give_up_after=patience)
            if sink.lost and outcome.error != RELEASED:
                outcome = Outcome(outcome.exit_code, sink.lost, lost=task.cacheable)
            if revoked.is_set() and outcome.error == "cancelled":
                return  # the service knows: it revoked the lease
            self._report(task, lease, piece.explain(outcome, output), patience)
        finally:
            if scratch_cwd is not None:
                self.cache.discard(scratch_cwd)

    def _stage(self, task: Task, deps: dict[str, dict[str, str]], lease: str,
               patience: float) -> None:
        """Inputs and dependencies' outputs into this worker's cache, each blob fetched
        once; a dependency's outputs are published here whole, like its own."""
        for sha in task.inputs.values():
            self._fetch(sha, lease, patience)
        for dep, files in deps.items():
            if self.cache.published(dep):
                continue
            for sha in sorted(set(files.values())):
                self._fetch(sha, lease, patience)
            self.cache.publish(dep, self.cache.assemble(dep, files), [])

    def _fetch(self, sha: str, lease: str, patience: float) -> None:
        if not self.cache.has_blob(sha):
            self.client.download(sha, self.name, lease, self.cache, patience)

    def _report(self, task: Task, lease: str, outcome: Outcome, patience: float) -> None:
        """Tell the service how the piece ended; for a success, upload the outputs it
        does not have yet (it says which) first."""
        body: dict[str, Any] = {"worker": self.name, "lease": lease,
                                "exit_code": outcome.exit_code, "error": outcome.error,
                                "lost": outcome.lost, "released": outcome.error == RELEASED}
        if outcome.exit_code == 0 and not outcome.error and task.cacheable:
            body["files"] = self.cache.manifest(task.id)
        for _ in range(UPLOAD_TRIES + 1):
            try:
                answer = self.client.json("POST", "/api/v1/worker/finish", patience,
                                          ok=(200, 409), json=body)
            except (Gone, Unreachable) as e:
                log.warning("pull worker %s: piece %s: not recorded: %s", self.name,
                            task.name, e)
                return
            missing = answer.get("missing")
            if not missing:
                log.info("pull worker %s: %s: %s", self.name, task.name, answer.get("status"))
                return
            try:
                for sha in missing:
                    self.client.upload(self.cache.blob(sha), sha, self.name, lease, patience)
            except HashMismatch as e:
                log.warning("pull worker %s: %s: %s", self.name, task.name, e)
            except (Gone, Unreachable) as e:
                log.warning("pull worker %s: %s: outputs not sent: %s", self.name, task.name, e)
                return
        body.update(exit_code=None, error=f"its outputs did not reach {self.client.server} "
                    "intact", lost=True, files=None)
        try:
            self.client.json("POST", "/api/v1/worker/finish", patience, json=body)
        except (Gone, Unreachable):
            pass
