"""May the fastest win: one job started on several backends at once.

Each lane runs the job as a job of its own. A lane's pieces carry the lane in what
their content address covers, so two lanes never share one running piece (that would
be no race) and each lane fills its own cache. The first lane to succeed is the result;
the others are cancelled, or with complete_all run to the end so their caches fill too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from . import jobs, logs, store
from .backends import registry
from .config import Settings
from .errors import ConfigError
from .hosts import resolve
from .logs import LogLine
from .models import Job, JobStatus, Task
from .runner import Helpers


@dataclass(frozen=True)
class Lane:
    backend: str
    host: str

    @property
    def label(self) -> str:
        return self.host or self.backend


def parse_lanes(spec: str, inventory: str | None = None) -> list[Lane]:
    """'h1,h2,local' -> lanes: a backend's name that needs no host runs there; any
    other word is a host, run on its inventory backend (default shell)."""
    lanes = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        if word in registry.names() and not registry.backend_class(word).needs_host:
            lanes.append(Lane(word, ""))
        else:
            lanes.append(Lane(resolve(word, inventory).backend, word))
    if len(lanes) < 2 or len(set(lanes)) != len(lanes):
        raise ConfigError("--race needs at least two different lanes, e.g. --race h1,local")
    return lanes


def lane_tasks(tasks: list[Task], lane: Lane) -> tuple[list[Task], dict[str, str]]:
    """The job's tasks re-addressed for one lane (dependencies follow the new ids);
    also returns old id -> new id."""
    renamed: dict[str, str] = {}
    out = []
    for task in tasks:  # in dependency order
        task.backend, task.host = lane.backend, lane.host
        task.environment = f"{task.environment}; lane {lane.label}"
        task.deps = [renamed.get(d, d) for d in task.deps]
        task.argv = [dict(a, dep=renamed.get(a["dep"], a["dep"]))
                     if isinstance(a, dict) and "dep" in a else a for a in task.argv]
        old, task.id = task.id, ""
        task.id = task.content_id()
        renamed[old] = task.id
        out.append(task)
    return out, renamed


def start(conn: redis.Redis, settings: Settings, lanes: list[Lane],
          build: Callable[[], tuple[Job, list[Task]]]) -> dict[str, Lane]:
    """Submit one job per lane; returns job id -> lane."""
    started: dict[str, Lane] = {}
    for lane in lanes:
        job, tasks = build()
        job.backend, job.host = lane.backend, lane.host
        job.out_dir = ""  # only the winner's results are written out, once it is known
        tasks, renamed = lane_tasks(tasks, lane)
        job.final_task = renamed.get(job.final_task, job.final_task)
        for name, value in job.params.items():  # a workflow's pointers to its tasks
            if isinstance(value, str) and value in renamed:
                job.params[name] = renamed[value]
        job.params["race"] = lane.label
        jobs.submit(conn, settings, job, tasks)
        started[job.id] = lane
    return started


def follow(conn: redis.Redis, settings: Settings, jobs: dict[str, Lane], queue: str,
           complete_all: bool) -> Iterator[tuple[Lane, LogLine] | tuple[Lane, str]]:
    """Every lane's lines as they come; then ('winner' or 'lost' notes) until decided."""
    helpers = {jid: Helpers(conn, settings, jid, queue) for jid in jobs}
    cursors = dict.fromkeys(jobs, "0-0")
    winner: str | None = None
    try:
        while True:
            for h in helpers.values():
                h.ensure()
            for jid, line in logs.tail(conn, cursors):
                yield jobs[jid], line
            states = {jid: store.get_job(conn, jid) for jid in jobs}
            if winner is None:
                winner = next((j for j, s in states.items()
                               if s.status == JobStatus.SUCCESS), None)
                if winner is not None:
                    yield from _decided(conn, jobs, states, winner, complete_all)
            if all(JobStatus(s.status).final for s in states.values()):
                if winner is None:
                    yield next(iter(jobs.values())), "no lane succeeded"
                return
    finally:
        for h in helpers.values():
            h.stop()


def _decided(conn: redis.Redis, jobs: dict[str, Lane], states: dict[str, Job], winner: str,
             complete_all: bool) -> Iterator[tuple[Lane, str]]:
    yield jobs[winner], f"winner: {jobs[winner].label} (job {winner})"
    if complete_all:
        return
    for jid, state in states.items():
        if jid != winner and not JobStatus(state.status).final:
            store.cancel_job(conn, jid)
            yield jobs[jid], f"cancelled: {jobs[jid].label} lost the race"


def winner_of(conn: redis.Redis, jobs: dict[str, Lane]) -> Job | None:
    """The lane job that succeeded first, if any."""
    done = [store.get_job(conn, j) for j in jobs]
    wins = [j for j in done if j.status == JobStatus.SUCCESS]
    return min(wins, key=lambda j: j.ended) if wins else None
