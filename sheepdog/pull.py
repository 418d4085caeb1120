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
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from . import piece
from .cache import Cache
from .config import Settings
from .defaults import (
    LOG_BATCH_LINES,
    PULL_CLAIM_WAIT,
    PULL_INLINE,
    PULL_LOG_EVERY,
    PULL_PREFETCH,
    PULL_PREFETCH_MOST,
    PULL_RENEW_EVERY,
)
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
        self._last = float("-inf")  # when lines last went: the first ones go at once

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

    def take(self) -> dict[str, Any]:
        """What waits to be sent, as a report's `lines` and `raw` (and no longer here)."""
        with self._sending, self._lock:
            lines, self._lines = self._lines, []
            raw, self._raw = self._raw, {}
        return {"lines": lines,
                "raw": {s: base64.b64encode(bytes(d)).decode() for s, d in raw.items()}}

    def flush(self) -> None:
        """Send what waits, at most every PULL_LOG_EVERY (a short piece's lines all go
        with its report), in one try: through an outage the lines wait for the next."""
        if (time.monotonic() - self._last < PULL_LOG_EVERY
                and len(self._lines) < LINES_PER_REQUEST):
            return
        with self._sending:
            while True:
                with self._lock:
                    lines, self._lines = self._lines[:LINES_PER_REQUEST], \
                        self._lines[LINES_PER_REQUEST:]
                    raw, self._raw = self._raw, {}
                if not lines and not raw:
                    return
                self._last = time.monotonic()  # a flush with nothing to send waits for none
                body = {"worker": self.worker, "lease": self.lease, "lines": lines,
                        "raw": {s: base64.b64encode(bytes(d)).decode() for s, d in raw.items()}}
                try:
                    self.client.json("POST", "/api/v1/worker/log", 0.0, json=body)
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
                    return


class _Pending:
    """One piece's report waiting for a request to carry it, and then its answer."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.done = threading.Event()
        self.answer: dict[str, Any] = {}
        self.error: Exception | None = None


class ReportBatch:
    """Reports of pieces that end while another report is on its way go together in the
    next request, as a database commits a group: a busy worker makes fewer requests than
    it runs pieces, an idle one sends each report at once. The claims they carry become
    one, whose pieces start here."""

    def __init__(self, worker: PullWorker) -> None:
        self.worker = worker
        self._lock = threading.Lock()
        self._waiting: list[_Pending] = []
        self._sending = False

    def send(self, body: dict[str, Any], patience: float) -> dict[str, Any]:
        """The service's answer to this report (Gone if it no longer holds the piece)."""
        mine = _Pending(body)
        with self._lock:
            self._waiting.append(mine)
            lead, self._sending = not self._sending, True
        if lead:  # no request is on its way: this thread sends, for all that come
            self._lead(patience)
        mine.done.wait()
        if mine.error is not None:
            raise mine.error
        if "gone" in mine.answer:
            raise Gone(str(mine.answer["gone"]))
        return mine.answer

    def _lead(self, patience: float) -> None:
        while True:
            with self._lock:
                batch, self._waiting = self._waiting, []
                if not batch:
                    self._sending = False
                    return
            try:
                answers = self._post([p.body for p in batch], patience)
                if len(answers) != len(batch):
                    raise SheepdogError(f"{self.worker.client.server} answered "
                                        f"{len(answers)} of {len(batch)} reports")
            except Exception as e:  # noqa: BLE001  each report's thread hears of it
                for p in batch:
                    p.error = e
                    p.done.set()
                continue
            for p, answer in zip(batch, answers, strict=True):
                p.answer = answer
                p.done.set()

    def _post(self, bodies: list[dict[str, Any]], patience: float) -> list[dict[str, Any]]:
        w = self.worker
        slots = sum(int(b.pop("claim", {}).get("slots", 0)) for b in bodies)
        request: dict[str, Any] = {"worker": w.name, "reports": bodies}
        if slots and not w.stopping.is_set():
            request["claim"] = {"queues": w.queues, "slots": slots, "host": w.host,
                                "instance": w.instance}
        answer = w.client.json("POST", "/api/v1/worker/finish", patience,
                               ok=(200, 409, 422), json=request)
        for found in answer.get("pieces", []):
            w._start(found)
        if "answers" not in answer:  # the request itself was refused (a damaged file)
            return [answer] * len(bodies)
        answers: list[dict[str, Any]] = answer["answers"]
        return answers


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
        self.instance = uuid.uuid4().hex  # this process: its claims, and its goodbye
        self.cache = Cache(settings.cache_dir)
        self.full_name = ""  # the service's name for this worker (token name + ours)
        self.lease_seconds = settings.lease_timeout
        self.stopping = threading.Event()
        self.leaving = threading.Event()
        self.fatal: Fatal | None = None
        self._leases: dict[str, threading.Event] = {}
        # pieces in hand that have not ended yet (staging, waiting for a slot, running):
        # up to PULL_PREFETCH more than the slots, so the next piece's claim and inputs
        # travel while one runs; its outputs and report travel after its slot is free
        self._running: set[str] = set()
        # places freed by pieces that ended, held for the claim their reports carry
        self._reserved = 0
        # how long pieces run, and a report takes to be answered (moving averages)
        self._run_seconds = self._report_seconds = 0.0
        self._slots = threading.Semaphore(self.concurrency)
        self._fetching: dict[str, threading.Event] = {}  # sha -> set once it is here
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._threads: list[threading.Thread] = []
        self._renewing = threading.Event()  # set: the renew loop ends
        self._greeted = threading.Event()  # set: the service answered hello
        self.reports: ReportBatch | None = None  # a service that takes them batched

    # -- lifecycle
    def run(self) -> None:
        """Work until stopped; Fatal if the service refuses this worker."""
        try:
            info = self.client.hello()
        except Unreachable:
            if self.stopping.is_set():
                return  # told to stop while waiting for the service: nothing to hand back
            raise
        self._greeted.set()
        self.lease_seconds = float(info.get("lease_seconds", self.lease_seconds))
        self.reports = ReportBatch(self) if info.get("batch_reports") else None
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
        else:
            self._say_goodbye()
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
        if not self._greeted.is_set():
            self.client.stopping.set()  # stop waiting out an outage of the service, too

    def _die(self, error: Fatal) -> None:
        log.error("pull worker %s: %s", self.name, error)
        self.fatal = error
        self.leaving.set()
        self.stopping.set()

    def _say_goodbye(self) -> None:
        """Tell the service this worker is going, so a claim of its still waiting there
        takes nothing more for it (a piece leased to a gone worker waits out its lease)."""
        try:
            self.client.json("POST", "/api/v1/worker/leave", give_up_after=0.0,
                             json={"worker": self.name, "instance": self.instance})
        except SheepdogError as e:
            log.info("pull worker %s: could not say goodbye: %s", self.name, e)

    def _claim_loop(self) -> None:
        while not self.stopping.is_set():
            with self._room:
                while (self._in_hand() - len(self._running) - self._reserved < self._enough()
                       and not self.stopping.is_set()):
                    self._room.wait(0.5)
                free = self._in_hand() - len(self._running) - self._reserved
            if free <= 0:
                continue
            if self.stopping.is_set():
                return
            try:
                answer = self.client.json("POST", "/api/v1/worker/claim",
                                          read_timeout=PULL_CLAIM_WAIT + 30, json={
                                              "worker": self.name, "queues": self.queues,
                                              "slots": free, "wait": PULL_CLAIM_WAIT,
                                              "host": self.host, "instance": self.instance})
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
            self._running.add(lease)
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
                self._running.discard(lease)
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
            with self._slots:  # a prefetched piece waits here for its turn
                started = time.monotonic()
                outcome = Outcome(None, RELEASED) if self.leaving.is_set() else piece.run(
                    task, self.settings, self.cache, output, revoked, self.leaving)
                self._run_seconds = self._average(self._run_seconds,
                                                  time.monotonic() - started)
            claim = self._ran(lease)
            try:
                if sink.lost and outcome.error != RELEASED:
                    outcome = Outcome(outcome.exit_code, sink.lost, lost=task.cacheable)
                if revoked.is_set() and outcome.error == "cancelled":
                    return  # the service knows: it revoked the lease
                self._report(task, lease, piece.explain(outcome, output), patience, sink,
                             claim)
            finally:
                self._unreserve(claim)
        finally:
            if scratch_cwd is not None:
                self.cache.discard(scratch_cwd)

    def _in_hand(self) -> int:
        return self.concurrency + self._prefetch()

    def _enough(self) -> int:
        """Free places worth a claim of their own: one when nothing is in hand; else half
        the hand, since each report claims its own piece's successor anyway (a prefetch
        that deepens as pieces get shorter is filled in a few claims, not one by one)."""
        held = len(self._running) + self._reserved
        return 1 if not held else max(1, self._in_hand() // 2)

    def _prefetch(self) -> int:
        """Pieces held beyond the slots: one, or for pieces shorter than a report's round
        trip as many as keep the slots busy while their predecessors' reports travel —
        twice the pieces run in one round trip, since the places of those whose reports
        are on their way are held for the pieces their answer brings."""
        if not self._run_seconds or not self._report_seconds:
            return PULL_PREFETCH
        ahead = int(2 * self._report_seconds / self._run_seconds) + 1
        return max(PULL_PREFETCH, min(PULL_PREFETCH_MOST, ahead * self.concurrency))

    @staticmethod
    def _average(old: float, new: float) -> float:
        return new if not old else 0.8 * old + 0.2 * new

    def _ran(self, lease: str) -> int:
        """The piece's slot is free: the place it held goes to the claim its report
        carries (1), unless the worker is going (0)."""
        with self._room:
            self._running.discard(lease)
            if self.stopping.is_set():
                self._room.notify_all()
                return 0
            self._reserved += 1
            return 1

    def _unreserve(self, held: int) -> None:
        if held:
            with self._room:
                self._reserved -= held
                self._room.notify_all()  # a report that brought nothing: the claim loop asks

    def _stage(self, task: Task, deps: dict[str, dict[str, str]], lease: str,
               patience: float) -> None:
        """Inputs and dependencies' outputs into this worker's cache, each blob fetched
        once; a dependency's outputs are published here whole, like its own."""
        needed = set(task.inputs.values())
        deps = {dep: files for dep, files in deps.items() if not self.cache.published(dep)}
        for files in deps.values():
            needed.update(files.values())
        missing = sorted(sha for sha in needed if not self.cache.has_blob(sha))
        mine, theirs = self._share(missing)
        log.info("pull worker %s: %s: %d of its %d files here already, %d on their way; "
                 "fetching %s", self.name, task.name, len(needed) - len(missing), len(needed),
                 len(theirs), " ".join(sha[:12] for sha in mine) or "none")
        try:
            self._fetch(mine, lease, patience)
        finally:
            with self._lock:
                for sha in mine:
                    self._fetching.pop(sha).set()
        for fetched in theirs:
            fetched.wait()
        self._fetch([sha for sha in missing if not self.cache.has_blob(sha)], lease, patience)
        for dep, files in deps.items():
            self.cache.publish(dep, self.cache.assemble(dep, files), [])

    def _share(self, missing: list[str]) -> tuple[list[str], list[threading.Event]]:
        """(the files this piece fetches, the events of those another piece of this
        worker is fetching right now): waited for, not fetched twice."""
        with self._lock:
            theirs = [self._fetching[sha] for sha in missing if sha in self._fetching]
            # not being fetched: not here yet, or another piece's fetch ended since the
            # caller looked (a fetch ends before it leaves _fetching): looked at again
            mine = [sha for sha in missing
                    if sha not in self._fetching and not self.cache.has_blob(sha)]
            for sha in mine:
                self._fetching[sha] = threading.Event()
        return mine, theirs

    def _fetch(self, shas: list[str], lease: str, patience: float) -> None:
        """The small ones in one request, the rest streamed one by one."""
        if not shas:
            return
        for sha, data in self.client.json("POST", "/api/v1/worker/fetch", patience, json={
                "worker": self.name, "lease": lease, "shas": shas})["blobs"].items():
            raw = base64.b64decode(data)
            if hashlib.sha256(raw).hexdigest() == sha:  # else it is streamed below
                self.cache.put_bytes(raw)
        for sha in shas:
            if not self.cache.has_blob(sha):
                self.client.download(sha, self.name, lease, self.cache, patience)

    def _report(self, task: Task, lease: str, outcome: Outcome, patience: float,
                sink: HttpLog | None = None, claim: int = 0) -> None:
        """Tell the service how the piece ended; for a success, with its outputs: the
        small ones inside the report, the rest uploaded when the service asks for them.
        `claim`: pieces to take in the same request (the answer brings them, if any wait
        now), so a busy worker makes one request per piece."""
        body: dict[str, Any] = {"worker": self.name, "lease": lease,
                                "exit_code": outcome.exit_code, "error": outcome.error,
                                "lost": outcome.lost, "released": outcome.error == RELEASED}
        if claim and not self.stopping.is_set():
            body["claim"] = {"queues": self.queues, "slots": claim, "host": self.host,
                             "instance": self.instance}
        if sink is not None:  # its last lines travel with the report: one request less
            body.update(sink.take())
        if outcome.exit_code == 0 and not outcome.error and task.cacheable:
            body["files"] = self.cache.manifest(task.id)
            body["blobs"] = self._inline(body["files"])
        for _ in range(UPLOAD_TRIES + 1):
            try:
                answer = self._send_report(body, patience)
            except (Gone, Unreachable) as e:
                log.warning("pull worker %s: %s: not recorded: %s", self.name, task.name, e)
                return
            if answer.get("status") == 422:  # an inline output arrived damaged
                log.warning("pull worker %s: %s: %s", self.name, task.name, answer["error"])
                continue  # the service lists what it lacks, sent again by upload
            if not answer.get("missing"):
                # each piece's end is in its job's log (a line per piece here, at info
                # level, cost a tenth of a busy worker's time)
                log.debug("pull worker %s: %s: %s", self.name, task.name,
                          answer.get("status"))
                return
            if self._upload(task, lease, answer["missing"], patience) is None:
                return  # a damaged upload (False) is sent again on the next round
        body.update(exit_code=None, error=f"its outputs did not reach {self.client.server} "
                    "intact", lost=True, files=None)
        try:
            self.client.json("POST", "/api/v1/worker/finish", patience, json=body)
        except (Gone, Unreachable):
            pass

    def _send_report(self, body: dict[str, Any], patience: float) -> dict[str, Any]:
        """One report request; what it carried once (lines, files, a claim) is not sent
        again, and the pieces its claim brought start."""
        asked = time.monotonic()
        if self.reports is not None:
            answer = self.reports.send(body, patience)
            body.pop("claim", None)  # it went with the batch, whatever it brought
        else:
            answer = self.client.json("POST", "/api/v1/worker/finish", patience,
                                      ok=(200, 409, 422), json=body)
        self._report_seconds = self._average(self._report_seconds, time.monotonic() - asked)
        for sent in ("lines", "raw", "blobs"):
            body.pop(sent, None)
        if "pieces" in answer:
            body.pop("claim", None)
        for found in answer.get("pieces", []):
            self._start(found)
        return answer

    def _inline(self, files: dict[str, str]) -> dict[str, str]:
        """Small outputs travel inside the report itself (base64): one request for a
        piece's end and its files, the usual case; larger ones are uploaded after."""
        inline: dict[str, str] = {}
        room = PULL_INLINE
        for sha in sorted(set(files.values())):
            path = self.cache.blob(sha)
            size = path.stat().st_size
            if size <= room:
                inline[sha] = base64.b64encode(path.read_bytes()).decode()
                room -= size
        return inline

    def _upload(self, task: Task, lease: str, shas: list[str], patience: float
                ) -> bool | None:
        """Send these blobs; False if one arrived damaged (sent again on the next
        round), None if the service cannot be reached or the piece is no longer ours."""
        try:
            for sha in shas:
                self.client.upload(self.cache.blob(sha), sha, self.name, lease, patience)
        except HashMismatch as e:
            log.warning("pull worker %s: %s: %s", self.name, task.name, e)
            return False
        except (Gone, Unreachable) as e:
            log.warning("pull worker %s: %s: outputs not sent: %s", self.name, task.name, e)
            return None
        return True
