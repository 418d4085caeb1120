#!/usr/bin/env python3
"""How long the `sheepdog` command takes to answer, on a real Redis started here.

    python3 bench/cli_bench.py [--runs 20] [--loop 100]

(a) `status JOB`, `list`, `logs JOB`, `result JOB` and `run --detach -- true`, each
    run --runs times as a user types them (the installed `sheepdog` script): the median
    wall time of each (target: <= 150 ms), and the five modules that took longest to
    import (`python -X importtime`, cumulative).
(b) --loop `sheepdog run --detach -- true` in a shell loop: jobs submitted per second
    (target: >= 10).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import RedisServer, free_port  # noqa: E402

TARGET = 0.150


def command() -> list[str]:
    """The `sheepdog` a user runs: the script installed beside this interpreter."""
    script = Path(sys.executable).with_name("sheepdog")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sheepdog"]


def timed(argv: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr[-500:]}")
    return took


def slowest_imports(args: list[str], env: dict[str, str], top: int = 5) -> list[str]:
    """The `top` modules with the longest cumulative import time (ms), outermost first."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "sheepdog", *args],
                         env=env, capture_output=True, text=True)
    rows = []
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = (part.strip() for part in line[len("import time:"):].split("|"))
        rows.append((int(cumulative), name))
    rows.sort(reverse=True)
    return [f"{name} {us / 1000:.0f}" for us, name in rows[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--loop", type=int, default=100)
    args = parser.parse_args()
    sheepdog = command()
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(free_port(), Path(tmp))
        server.start()
        try:
            # as a user's machine has it: the bytecode written once, then used
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env.update(SHEEPDOG_REDIS_URL=server.url, SHEEPDOG_HOME=str(Path(tmp) / "home"))
            subprocess.run([*sheepdog, "run", "--", "echo", "hello"], env=env,
                           capture_output=True, text=True, check=True)
            listed = json.loads(subprocess.run([*sheepdog, "list", "--json"], env=env,
                                               text=True, capture_output=True,
                                               check=True).stdout)
            job = (listed["jobs"] if isinstance(listed, dict) else listed)[0]["id"]
            print(f"(a) each command {args.runs} times, median wall time "
                  f"(target <= {TARGET * 1000:.0f} ms); slowest imports, cumulative ms")
            for line in (["status", job], ["list"], ["logs", job], ["result", job],
                         ["run", "--detach", "--", "true"]):
                times = [timed([*sheepdog, *line], env) for _ in range(args.runs)]
                median = statistics.median(times)
                print(f"  sheepdog {' '.join(line[:1] + (['JOB'] if job in line else line[1:]))}:"
                      f" {median * 1000:.0f} ms {'ok' if median <= TARGET else 'SLOW'}"
                      f"   imports: {', '.join(slowest_imports(line, env))}")
            shell = shutil.which("bash") or "/bin/sh"
            loop = (f'i=0; while [ "$i" -lt {args.loop} ]; do '
                    f'"$@" run --detach -- true > /dev/null || exit 1; i=$((i+1)); done')
            started = time.perf_counter()
            subprocess.run([shell, "-c", loop, "loop", *sheepdog], env=env, check=True)
            took = time.perf_counter() - started
            print(f"(b) {args.loop} `sheepdog run --detach -- true` in a shell loop: "
                  f"{args.loop / took:.1f} jobs/s (target >= 10)")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
