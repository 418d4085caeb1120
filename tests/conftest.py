"""Fixtures that start and stop real services: redis-server, sheepdog workers."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import redis

from sheepdog.config import Settings

ROOT = Path(__file__).resolve().parent.parent
BXD = ROOT / "sheepdog" / "examples" / "bxd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate, timeout: float = 10.0, every: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pytest_configure(config) -> None:
    # The commands the tests start (`sheepdog`, `sheepdog-gemma-wrapper`, examples'
    # scripts) are the ones installed beside the interpreter that runs the tests, as
    # in an activated virtualenv, even when it was started by path (.venv/bin/python).
    scripts = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = os.pathsep.join([scripts, os.environ.get("PATH", "")])


# No test writes outside its temporary directory: what /tmp (pytest's own folders
# aside) and $HOME hold is listed when the session starts and compared when it ends.
_TMP = Path("/tmp")
_HOME = Path.home()


def _tmp_entries() -> set[str]:
    return {name for name in os.listdir(_TMP) if not name.startswith("pytest-of-")}


def _home_files() -> set[str]:
    found: set[str] = set()
    for where, dirs, files in os.walk(_HOME):
        found.update(os.path.join(where, name) for name in dirs + files)
    return found


_BEFORE = pytest.StashKey[tuple[set[str], set[str]]]()


def _controller(config) -> bool:
    """Not one of pytest-xdist's workers: the process that sees the whole session."""
    return not hasattr(config, "workerinput")


def pytest_sessionstart(session) -> None:
    if _controller(session.config):  # before any worker starts, after every one ends
        session.config.stash[_BEFORE] = (_tmp_entries(), _home_files())


_KEPT: list[IO[str]] = []  # this worker's exclusive hold, kept while `alone` tests follow


@contextmanager
def _turn(config, alone: bool = False, keep: bool = False) -> Iterator[None]:
    """With -n, a test marked `alone` (it times the service under load) runs while no
    other test or session set-up does: those hold one file lock shared, it holds it
    alone. A waiting `alone` test leaves a file that keeps new shared holders out, so the
    other worker's next test cannot keep it waiting. `keep` holds it on for the next
    `alone` test (they are one xdist group), so it waits for the other worker once."""
    if _controller(config):
        yield
        return
    root = Path(config.option.basetemp or tempfile.gettempdir()).parent  # the run's own
    wanted = root / f"alone-wanted.{os.getpid()}"
    lock = _KEPT.pop() if alone and _KEPT else None
    if lock is None:
        lock = open(root / "alone.lock", "a")
        if alone:
            wanted.touch()
            fcntl.flock(lock, fcntl.LOCK_EX)
            wanted.unlink()
        else:
            while any(root.glob("alone-wanted.*")):
                time.sleep(0.1)
            fcntl.flock(lock, fcntl.LOCK_SH)
    try:
        yield
    finally:
        if alone and keep:
            _KEPT.append(lock)
        else:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()


def _alone(item) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


_NEXT_ALONE = pytest.StashKey[bool]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem) -> None:
    item.stash[_NEXT_ALONE] = _alone(nextitem)


@pytest.fixture(autouse=True)
def one_turn(request) -> Iterator[None]:
    with _turn(request.config, _alone(request.node), request.node.stash.get(_NEXT_ALONE, False)):
        yield


# With -n (pytest-xdist, --dist loadgroup), the tests that share a session-wide thing
# run on one worker, so it is started once: one Slurm, one GEMMA reference run.
_GROUPS = {"slurm": "slurm", "gemma_loco_kinships": "gemma-reference"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        group = next((g for f, g in _GROUPS.items() if f in names), None)
        group = group or ("alone" if _alone(item) else None)  # one worker, one wait
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session, exitstatus) -> None:
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    gained = sorted(str(_TMP / n) for n in _tmp_entries() - before[0])
    gained += sorted(_home_files() - before[1])
    if gained:
        shown = "\n  ".join(gained[:40]) + ("\n  ..." if len(gained) > 40 else "")
        print(f"\nFAILED: the tests wrote outside their temporary directories "
              f"({len(gained)} new):\n  {shown}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def private_tmpdir(tmp_path_factory) -> Iterator[Path]:
    """TMPDIR for the whole session, under pytest's own: what the tests and the
    programs they start put in "the temporary directory" stays in the test's tree. So do
    the per-user runtime, cache and config folders programs fall back to $HOME for
    (Chromium's dconf and crash reports, for two), as a desktop session would give them."""
    path = tmp_path_factory.mktemp("TMPDIR")
    private = {"TMPDIR": path, "XDG_RUNTIME_DIR": tmp_path_factory.mktemp("runtime"),
               "XDG_CACHE_HOME": tmp_path_factory.mktemp("cache"),
               # Chromium's crash reports; and no user's ~/.config/sheepdog reaches a test
               "XDG_CONFIG_HOME": tmp_path_factory.mktemp("config")}
    before = {name: os.environ.get(name) for name in private}, tempfile.tempdir
    for name, where in private.items():
        where.chmod(0o700)
        os.environ[name] = str(where)
    tempfile.tempdir = str(path)
    yield path
    for name, value in before[0].items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    tempfile.tempdir = before[1]


@dataclass
class RedisServer:
    """A real redis-server with AOF (fsync always) in a private directory."""

    port: int
    dir: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (see .ci/run)"
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "",
             "--daemonize", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(up, what="redis-server to answer")

    def kill9(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def conn(redis_server) -> Iterator[redis.Redis]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture()
def home(tmp_path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture()
def queue(request) -> str:
    """A queue of this test's own: a worker left over from another test never takes its
    pieces (it would publish them into that test's store)."""
    return "q-" + request.node.name[-40:].replace("[", "-").replace("]", "")


@pytest.fixture()
def settings(redis_server, home, queue) -> Settings:
    return Settings(redis_url=redis_server.url, home=home, heartbeat_timeout=2.0, queue=queue)


@pytest.fixture()
def env(redis_server, home, conn, queue) -> dict[str, str]:
    """Environment for sheepdog subprocesses: the test Redis (emptied), a private home
    and queue."""
    e = dict(os.environ)
    e.update(SHEEPDOG_REDIS_URL=redis_server.url, SHEEPDOG_HOME=str(home),
             SHEEPDOG_HEARTBEAT_TIMEOUT="2", SHEEPDOG_QUEUE=queue, PYTHONUNBUFFERED="1")
    return e


def sheepdog(*args: str, env: dict[str, str], timeout: float = 120,
             cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sheepdog", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


class Workers:
    """`sheepdog worker` processes started by a test and always stopped after it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", *args],
                                env=env or self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture()
def workers(env) -> Iterator[Workers]:
    w = Workers(env)
    yield w
    w.stop_all()


@pytest.fixture(scope="session")
def gemma_loco_kinships(tmp_path_factory, pytestconfig):
    """GEMMA's own LOCO kinships for BXD (computed once per test session)."""
    assert shutil.which("gemma"), "GEMMA is not installed (see .ci/run)"
    from gemma_reference import loco_kinships

    work = tmp_path_factory.mktemp("gemma-reference")
    with _turn(pytestconfig):  # twenty GEMMA runs: not while an `alone` test times
        return work, loco_kinships(work)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory, pytestconfig):
    """A real single-node Slurm for the whole session (munge, slurmctld, slurmd)."""
    import slurm_cluster

    with _turn(pytestconfig):
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm"), free_port())
    yield cluster
    cluster.stop()
