#!/usr/bin/env python3
"""A CWL scatter through sheepdog against cwltool itself, in the same run.

    python3 bench/cwl_bench.py [--n 1000] [--workers 2]

An --n element scatter of a trivial tool (`echo`), run by `sheepdog-cwl-runner` (--workers
worker processes, 2 slots each, on a redis-server started here; the invocations go as
chunks built by cwltool on the workers, sheepdog.cwlbatch) and by `cwltool --parallel
--no-container`, --rounds times interleaved; the best seconds of each and the ratio
(target: sheepdog at least 2x faster), the runner process's own CPU seconds, and where
sheepdog's time went (before the first piece, in the pieces, after the last). Then a small
real pipeline, the BXD GEMMA LOCO scan written in CWL (examples/cwl/gemma-loco.cwl: 40
GEMMA runs, one piece each), both ways, --rounds times interleaved (target: sheepdog no
slower).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent
TOOL = """cwlVersion: v1.2
class: CommandLineTool
baseCommand: echo
inputs:
  word: {type: string, inputBinding: {position: 1}}
stdout: out.txt
outputs:
  out: {type: stdout}
"""
WORKFLOW = """cwlVersion: v1.2
class: Workflow
requirements:
  ScatterFeatureRequirement: {}
inputs:
  words: string[]
outputs:
  outs:
    type: File[]
    outputSource: echo/out
steps:
  echo:
    run: echo.cwl
    scatter: word
    in: {word: words}
    out: [out]
"""


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, dict]:
    """Wall seconds, the runner's own CPU seconds, and its output object."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert done.returncode == 0, done.stderr[-3000:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, cpu, json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="of each, interleaved")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cwl-bench-"))
    (work / "echo.cwl").write_text(TOOL)
    (work / "scatter.cwl").write_text(WORKFLOW)
    (work / "job.json").write_text(json.dumps({"words": [f"w{i}" for i in range(args.n)]}))
    server = RedisServer(free_port(), work)
    server.start()
    env = dict(os.environ, SHEEPDOG_REDIS_URL=server.url, SHEEPDOG_HOME=str(work / "home"),
               SHEEPDOG_QUEUE="cwl", TMPDIR=str(work))
    workers = [subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", "-j", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True) for _ in range(args.workers)]
    scatter: dict[str, list[tuple[float, float, str]]] = {"sheepdog": [], "cwltool": []}
    pipeline: dict[str, list[float]] = {"sheepdog": [], "cwltool": []}
    try:
        time.sleep(2)  # the workers are up
        for r in range(args.rounds):
            for who, runner in (("sheepdog", [str(BIN / "sheepdog-cwl-runner")]),
                                ("cwltool", [str(BIN / "cwltool"), "--parallel",
                                             "--no-container"])):
                started = time.time()
                took, cpu, out = timed([*runner, "--quiet", "--outdir",
                                        str(work / f"{who}-{r}"), "scatter.cwl", "job.json"],
                                       env, work)
                assert len(out["outs"]) == args.n
                said = where(server.url, started, took) if who == "sheepdog" else ""
                scatter[who].append((took, cpu, said))
        example = ROOT / "examples" / "cwl"
        for r in range(args.rounds):
            for who, runner in (("sheepdog", [str(BIN / "sheepdog-cwl-runner")]),
                                ("cwltool", [str(BIN / "cwltool"), "--parallel",
                                             "--no-container"])):
                took, _, out = timed([*runner, "--quiet", "--outdir",
                                      str(work / f"{who}-gemma-{r}"), "gemma-loco.cwl",
                                      "gemma-loco.yml"], env, example)
                assert len(out["assoc"]) == 20
                pipeline[who].append(took)
    finally:
        for w in workers:
            w.terminate()
            w.wait(30)
        server.stop()
    (ours, our_cpu, said), (theirs, their_cpu, _) = (min(scatter[w]) for w in scatter)
    print(f"{args.n:,d}-element scatter of echo, best of {args.rounds}: sheepdog-cwl-runner "
          f"({args.workers} workers x 2) {ours:.1f} s, its own CPU {our_cpu:.1f} s; cwltool "
          f"--parallel --no-container {theirs:.1f} s, CPU {their_cpu:.1f} s; sheepdog "
          f"{theirs / ours:.2f}x as fast (target >= 2x)")
    print(f"  where sheepdog's {ours:.1f} s went: {said}")
    best = {who: min(times) for who, times in pipeline.items()}
    print(f"GEMMA LOCO in CWL (BXD, 40 GEMMA runs), best of {args.rounds}: sheepdog-cwl-runner "
          f"{best['sheepdog']:.1f} s, cwltool --parallel {best['cwltool']:.1f} s; sheepdog "
          f"{best['cwltool'] / best['sheepdog']:.2f}x as fast (target >= 1x)")


def where(url: str, started: float, took: float) -> str:
    """The newest CWL job's pieces against the run's start: the time before the first
    piece was queued (starting Python, loading cwltool, reading and checking the
    workflow, the scatter's elements deferred), in the pieces (cwltool building and
    running each invocation on the workers), and after the last ended."""
    from sheepdog import store
    from sheepdog.config import load
    from sheepdog.connection import connect

    conn = connect(load(redis_url=url))
    job = next(j for j in store.list_jobs(conn, 20) if j.workflow == "cwl")
    pieces = store.job_tasks(conn, job.id)
    first = min(t.queued_at for t in pieces) - started
    last = max(t.ended for t in pieces) - started
    return (f"{first:.1f} s before the first piece (Python, cwltool loading and checking "
            f"the workflow), {last - first:.1f} s in {len(pieces)} pieces (cwltool "
            "building and running the invocations on the workers), "
            f"{took - last:.1f} s after (the outputs moved to --outdir, the object printed)")


if __name__ == "__main__":
    main()
