"""A task farm (IMP.parallel's shape): many small Python tasks, a model loaded once per
worker process, results taken as they complete, and a worker killed halfway — its
tasks run again on the other one.

    python3 examples/task_farm/farm.py [TASKS]
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import sys
import time

from sheepdog import Executor


def load_model() -> dict:
    """The expensive set-up, paid once per worker process (IMP's context)."""
    time.sleep(0.3)
    return {"pid": os.getpid(), "weights": [0.5, 1.5, 2.0]}


def score(x: int, context: dict) -> tuple[int, float, int]:
    time.sleep(0.01)
    return x, sum(w * x for w in context["weights"]), context["pid"]


def main(tasks: int) -> int:
    answered: dict[int, float] = {}
    killed = None
    with Executor(max_workers=2, setup=load_model, batch_size=4) as ex:
        futures = [ex.submit(score, x) for x in range(tasks)]
        for future in concurrent.futures.as_completed(futures):
            x, value, _pid = future.result()
            assert x not in answered, f"task {x} answered twice"
            answered[x] = value
            if len(answered) == tasks // 2 and killed is None and len(ex.worker_pids) > 1:
                killed = ex.worker_pids[0]
                os.kill(killed, signal.SIGKILL)  # a lost worker: its tasks run elsewhere
    assert sorted(answered) == list(range(tasks))
    assert all(answered[x] == 4.0 * x for x in answered)
    print(f"{len(answered)} tasks answered, each once; worker {killed} was killed halfway")
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200))
