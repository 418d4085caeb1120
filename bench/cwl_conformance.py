#!/usr/bin/env python3
"""The CWL v1.2 conformance suite through `sheepdog-cwl-runner` (every tool invocation a
piece run by a sheepdog worker), with cwltest; optionally cwltool itself on the same
suite in the same run, as the baseline.

    python3 bench/cwl_conformance.py [--suite DIR] [--tags required] [-j 2] [--baseline]

DIR is the suite's checkout (conformance_tests.yaml and tests/; default
../shared/reference/cwl-v1.2 beside the project). Prints passed / failed / unsupported
by tag, and with --baseline the tests cwltool passes that sheepdog does not (target:
none). A Redis server and one worker (-j 4) are started for the run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

BIN = Path(sys.executable).parent


def by_tag(badges: Path) -> dict[str, dict[str, set[str]]]:
    """cwltest's --badgedir pages: tag -> passed/failed/unsupported -> test ids."""
    found: dict[str, dict[str, set[str]]] = {}
    for page in sorted(badges.glob("*.md")):
        lists: dict[str, set[str]] = {"passed": set(), "failed": set(), "unsupported": set()}
        current = None
        for line in page.read_text().splitlines():
            heading = re.match(r"## List of (\w+) tests", line)
            if heading:
                current = heading.group(1)
            elif current in lists and line.startswith("- ["):
                lists[current].add(line[3:line.index("]")])
        found[page.stem] = lists
    return found


def suite_run(tool: Path, suite: Path, tags: str, jobs: int, work: Path, env: dict[str, str],
              extra: list[str]) -> tuple[dict[str, dict[str, set[str]]], float]:
    badges = work / f"badges-{tool.name}"
    started = time.perf_counter()
    subprocess.run([str(BIN / "cwltest"), "--test", "conformance_tests.yaml", "--tool",
                    str(tool), "-j", str(jobs), "--timeout", "120", "--badgedir", str(badges),
                    *(["--tags", tags] if tags else []), *(["--", *extra] if extra else [])],
                   cwd=suite, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return by_tag(badges), time.perf_counter() - started


def table(results: dict[str, dict[str, set[str]]]) -> None:
    print(f"  {'tag':32s} {'passed':>7s} {'failed':>7s} {'unsupported':>12s}")
    for tag in sorted(results, key=lambda t: (t != "all", t)):
        r = results[tag]
        print(f"  {tag:32s} {len(r['passed']):7d} {len(r['failed']):7d} "
              f"{len(r['unsupported']):12d}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path,
                        default=ROOT.parent / "shared" / "reference" / "cwl-v1.2")
    parser.add_argument("--tags", default="", help="only these cwltest tags (e.g. required)")
    parser.add_argument("-j", type=int, default=2, help="tests at once")
    parser.add_argument("--baseline", action="store_true", help="cwltool on the suite too")
    args = parser.parse_args()
    if not (args.suite / "conformance_tests.yaml").is_file():
        sys.exit(f"{args.suite}: no conformance_tests.yaml (give the suite with --suite)")
    work = Path(tempfile.mkdtemp(prefix="cwl-conformance-"))
    server = RedisServer(free_port(), work)
    server.start()
    env = dict(os.environ, SHEEPDOG_REDIS_URL=server.url, SHEEPDOG_HOME=str(work / "home"),
               SHEEPDOG_QUEUE="cwl", TMPDIR=str(work))
    worker = subprocess.Popen([sys.executable, "-m", "sheepdog", "worker", "-j", "4"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        ours, took = suite_run(BIN / "sheepdog-cwl-runner", args.suite, args.tags, args.j,
                               work, env, [])
        print(f"sheepdog-cwl-runner, -j {args.j}, {took:.0f} s:")
        table(ours)
        if args.baseline:
            theirs, took = suite_run(BIN / "cwltool", args.suite, args.tags, args.j, work,
                                     env, ["--no-container"])
            print(f"cwltool --no-container, -j {args.j}, {took:.0f} s:")
            table(theirs)
            lost = sorted(theirs["all"]["passed"] - ours["all"]["passed"])
            print(f"passed by cwltool, not by sheepdog: {len(lost)} {lost[:20]} (target 0)")
    finally:
        worker.terminate()
        worker.wait(30)
        server.stop()


if __name__ == "__main__":
    main()
