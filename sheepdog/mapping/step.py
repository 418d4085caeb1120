"""The Python steps of `map`, run as task processes (or in-process by the local backend):

    python -m sheepdog.mapping.step run|run-many SPEC [--cwd DIR] [--input NAME PATH ...]
    python -m sheepdog.mapping.step gather [--check FIELD ...] INDEX CHUNK_DIR ...

`run` and `run-many` run a chunk's items one after another and write `results.jsonl`
(one record per item, in order) and each item's files under `files/<n>/` (an item
writes them to $SHEEPDOG_ITEM_DIR, a fresh empty directory while it runs). `run` is
for a few items, in-process in the worker, each item in its own guarded process group;
`run-many` runs as a process of its own (the worker guards its group) and starts each
item inside that group by posix_spawn, read by one poll loop: a tiny item costs under a
millisecond, not five. A failing item is recorded, never
fatal: the step exits 0 unless it could not run at all. `gather` checks every item is
accounted for exactly once and that JSON outputs agree on the --check fields, and exits
1 naming the items that failed or disagree. Only the standard library is imported from
here: this code runs on hosts whose Python has nothing else.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..defaults import WATCH_POLL
from ..errors import SheepdogError
from ..process import (
    Process,
    environment,
    light_groups,
    own_directory,
    run_light,
    spawn_moves_child,
)

IN_PROCESS = frozenset({"run", "gather"})
OUTPUT_MAX = 1 << 20  # bytes of an item's stdout kept in its record
STDERR_TAIL = 20  # lines of an item's stderr kept in its record
RESULTS = "results.jsonl"
Emit = Callable[[str], None]


class ItemOutput:
    """One item's output: lines to the job's log, stdout bytes and a stderr tail kept."""

    def __init__(self, emit: Emit, complain: Emit) -> None:
        self.emit, self.complain = emit, complain
        self.stdout = bytearray()
        self.truncated = False
        self.stderr: deque[str] = deque(maxlen=STDERR_TAIL)

    def __call__(self, stream: str, lines: list[str]) -> None:
        for line in lines:
            if stream == "stdout":
                self.emit(line)
            else:
                self.stderr.append(line)
                self.complain(line)

    def raw(self, stream: str, chunk: bytes) -> None:
        if stream != "stdout":
            return
        room = OUTPUT_MAX - len(self.stdout)
        if len(chunk) > room:
            self.truncated = True
        self.stdout += chunk[:max(0, room)]


def _argv(parts: list[list[Any]], inputs: dict[str, str]) -> list[str]:
    out = []
    for arg in parts:
        text = ""
        for part in arg:
            if isinstance(part, str):
                text += part
            elif part.get("input") in inputs:
                text += inputs[part["input"]]
            else:
                raise SheepdogError(f"the item names input {part!r}, which was not staged")
        out.append(text)
    return out


def run_item(argv: list[str], cwd: str, env: dict[str, str], timeout: float,
             output: ItemOutput, stop: threading.Event) -> tuple[str, int | None]:
    """Run one item to its end: (status, exit code)."""
    try:
        proc = Process(argv, cwd, env, output, whole_group=True)
    except OSError as e:
        output("stderr", [f"cannot start {argv[0]!r}: {e.strerror or e}"])
        return "failed", 127
    deadline = time.monotonic() + timeout if timeout > 0 else None
    while True:
        code = proc.poll()
        if code is not None:
            return ("success" if code == 0 else "failed"), code
        if stop.is_set():
            proc.kill()
            return "cancelled", None
        if deadline is not None and time.monotonic() > deadline:
            proc.kill()
            output("stderr", [f"timed out after {timeout:g}s"])
            return "timeout", None
        proc.wait(WATCH_POLL if deadline is None
                  else max(0.001, min(WATCH_POLL, deadline - time.monotonic())))


def _runner(many: bool) -> tuple[Callable[..., tuple[str, int | None]], bool]:
    """How each item starts, and whether this thread moves to the items' directory:
    run-many's by posix_spawn in its own group; `run`'s (on a worker's thread) each in a
    light group of its own, kept so it dies with the worker, moved to its directory by
    posix_spawn itself or else from a thread with a directory of its own; where neither
    can be, each as a guarded Process."""
    if many:
        return run_light, True
    if light_groups() and spawn_moves_child():
        return functools.partial(run_light, own_group=True, child_cwd=True), False
    if light_groups() and own_directory():
        return functools.partial(run_light, own_group=True), True
    return run_item, False


def _files(directory: str) -> list[str]:
    """The files an item left in its directory."""
    return sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*")
                  if p.is_file())


def _earlier(here: str) -> list[str]:
    """The records an earlier, killed attempt of this chunk wrote (its scratch is a
    sibling named by the same task id, its partial file no longer locked by a live
    step), with its items' files moved here: those items are not run again. (Paths as
    text: this runs for every piece, and pathlib costs more than the scan.)"""
    parent, name = os.path.split(here)
    task = name.split(".", 1)[0] + "."
    top = os.path.join(here, "files")
    best: list[str] = []
    with os.scandir(parent) as found:  # a scan, not a glob: this runs for every chunk
        siblings = [e.path for e in found if e.name.startswith(task) and e.name != name]
    for sibling in siblings:
        part = os.path.join(sibling, RESULTS + ".part")
        if not os.path.isfile(part):
            continue
        with open(part, "rb+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live attempt (a twin): not ours to take
            lines = f.read().decode("utf-8", errors="replace").split("\n")[:-1]  # whole ones
        if len(lines) > len(best):
            for n in range(len(lines)):
                files = os.path.join(sibling, "files", str(n))
                if os.path.isdir(files):
                    os.makedirs(top, exist_ok=True)
                    shutil.rmtree(os.path.join(top, str(n)), ignore_errors=True)
                    os.rename(files, os.path.join(top, str(n)))
            best = lines
        shutil.rmtree(sibling, ignore_errors=True)
    return best


def run_chunk(spec: dict[str, Any], inputs: dict[str, str], cwd: str | None, here: Path,
              emit: Emit, complain: Emit, stop: threading.Event, light: bool = False) -> None:
    """Every item of the chunk, one record each into results.jsonl, each written as its
    item ends: a rerun of a killed attempt runs only the items it had not recorded."""
    items = spec["items"]
    env = _environment(spec)
    at = os.fspath(here)
    if len(items) == 1 and not light and not os.listdir(at):
        recorded = _earlier(at)
        if not recorded:  # one item, in the piece's own fresh directory: see _only
            _only(items[0], spec, inputs, cwd, at, env, emit, complain, stop)
            return
    partial = here / (RESULTS + ".part")
    top = here / "files"  # made when the first item leaves files
    # Items run one after another in one scratch directory, renamed to files/<n> only
    # when the item left something there: a mkdir costs more than a `true` item here.
    scratch = os.path.join(here, ".item")
    env["SHEEPDOG_ITEM_DIR"] = scratch
    inside = -1  # the inode of the scratch directory run-many is in (its items start there)
    run, move = _runner(light)
    with open(partial, "w", encoding="utf-8") as out:
        fcntl.flock(out, fcntl.LOCK_EX)  # held while this attempt lives (see _earlier)
        recorded = _earlier(at)
        for line in recorded:
            out.write(line + "\n")
        for n, item in enumerate(items):
            if n < len(recorded):
                continue
            try:
                inode = os.stat(scratch).st_ino
            except FileNotFoundError:  # renamed to its item's files, or removed by it
                os.mkdir(scratch)
                inode = os.stat(scratch).st_ino
            if move and inode != inside:
                os.chdir(cwd or scratch)
                inside = inode
            env["SHEEPDOG_ITEM_KEY"] = item["key"]
            record = _run(run, item, spec, inputs, cwd or scratch, env, emit, complain, stop)
            if os.listdir(scratch):
                top.mkdir(exist_ok=True)
                files = os.path.join(top, str(n))
                os.rename(scratch, files)
                record["files"] = _files(files)
            out.write(json.dumps(record) + "\n")
            out.flush()  # in the kernel's hands: a SIGKILL of this process loses nothing
    # what is left was written after its item ended (a straggling child): no item's
    shutil.rmtree(scratch, ignore_errors=True)
    partial.rename(here / RESULTS)


def _environment(spec: dict[str, Any]) -> dict[str, str]:
    """One environment for the chunk, each item's key set in it in turn (posix_spawn
    copies it), rather than a copy of the whole environment per item."""
    return dict(environment(), **{k: str(v) for k, v in spec.get("env", {}).items()})


def _run(run: Callable[..., tuple[str, int | None]], item: dict[str, Any],
         spec: dict[str, Any], inputs: dict[str, str], cwd: str, env: dict[str, str],
         emit: Emit, complain: Emit, stop: threading.Event) -> dict[str, Any]:
    """One item to its end: its record (without its files)."""
    output = ItemOutput(emit, complain)
    started = time.monotonic()
    status, code = run(_argv(item["argv"], inputs), cwd, env,
                       float(spec.get("timeout") or 0), output, stop)
    if status == "cancelled":
        raise SheepdogError("cancelled")
    record: dict[str, Any] = {
        "status": status, "exit_code": code,
        "output": output.stdout.decode("utf-8", errors="replace"),
        "stderr": "\n".join(output.stderr),
        "seconds": round(time.monotonic() - started, 4), "files": []}
    if output.truncated:
        record["output_truncated"] = True
    return record


def _only(item: dict[str, Any], spec: dict[str, Any], inputs: dict[str, str],
          cwd: str | None, here: str, env: dict[str, str], emit: Emit, complain: Emit,
          stop: threading.Event) -> None:
    """A chunk of one item (`--chunk 1`, a piece per item) runs it in the piece's own
    directory, fresh and empty, rather than in a scratch directory made and removed
    inside it (a directory's inode costs more than a `true` item here); what it left
    there becomes its files/0 afterwards (so only a directory found empty is used: a
    process step's may hold its staged spec). Nothing is resumed from a killed attempt
    of one item, so no partial file is written, or locked, while it runs."""
    env["SHEEPDOG_ITEM_DIR"] = here
    env["SHEEPDOG_ITEM_KEY"] = item["key"]
    run, move = _runner(False)
    if move:
        os.chdir(cwd or here)
    record = _run(run, item, spec, inputs, cwd or here, env, emit, complain, stop)
    left = os.listdir(here)
    if left:  # gathered under a name the item did not use, then renamed to files/0
        held = tempfile.mkdtemp(prefix=".item-", dir=here)
        for name in left:
            os.rename(os.path.join(here, name), os.path.join(held, name))
        files = os.path.join(here, "files")
        os.mkdir(files)
        os.rename(held, os.path.join(files, "0"))
        record["files"] = _files(os.path.join(files, "0"))
    # not the name a twin's _earlier takes over, which it would while this one renames
    written = os.path.join(here, RESULTS + ".one")
    fd = os.open(written, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # no text layer
    try:
        data = memoryview((json.dumps(record) + "\n").encode())
        while data:  # an item's output may be a megabyte
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)
    os.rename(written, os.path.join(here, RESULTS))


# ---------------------------------------------------------------- merging


def records(index: dict[str, Any], chunk_dirs: Sequence[str | Path | None],
            states: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every item's record in input order, with its key and 1-based index. A later chunk
    overrides an earlier one for the same item (a retry); the items of a chunk with no
    directory yet take its state (`states`, e.g. "queued"), or `missing`."""
    keys: list[str] = index["keys"]
    if len(chunk_dirs) != len(index["chunks"]):
        raise SheepdogError(f"{len(chunk_dirs)} chunk directories for "
                            f"{len(index['chunks'])} chunks")
    found: list[tuple[int, int] | None] = [None] * len(keys)
    lines: dict[int, list[str]] = {}
    for chunk, (directory, positions) in enumerate(zip(chunk_dirs, index["chunks"],
                                                       strict=True)):
        if directory is None:
            continue
        path = os.path.join(directory, RESULTS)  # text, not Paths: once per piece of a job
        with open(path, encoding="utf-8") as f:
            text = f.read().splitlines()
        if len(text) != len(positions):
            raise SheepdogError(f"{path}: {len(text)} records for {len(positions)} items")
        lines[chunk] = text
        for line_no, position in enumerate(positions):
            found[position] = (chunk, line_no)
    owner = _owners(index) if None in chunk_dirs else []
    for position, where in enumerate(found):
        head = {"key": keys[position], "index": index["indices"][position]}
        if where is None:
            state = (states[owner[position]] if states and owner else "missing")
            yield {**head, "status": state, "exit_code": None, "output": "", "stderr": "",
                   "files": []}
            continue
        chunk, line_no = where
        directory = chunk_dirs[chunk]
        record = json.loads(lines[chunk][line_no])
        record["files_dir"] = os.path.join(directory, "files", str(line_no)) if directory else ""
        yield {**head, **record}


def _owners(index: dict[str, Any]) -> list[int]:
    """position -> the last chunk that holds it."""
    owner = [0] * len(index["keys"])
    for chunk, positions in enumerate(index["chunks"]):
        for position in positions:
            owner[position] = chunk
    return owner


def disagreements(field: str, values: dict[str, list[str]]) -> str:
    """'FIELD: "a" in items k1, k2; "b" in item k3' when items disagree."""
    parts = []
    for value, keys in sorted(values.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(keys[:10]) + (f" and {len(keys) - 10} more" if len(keys) > 10 else "")
        parts.append(f"{value} in item{'s' if len(keys) > 1 else ''} {shown}")
    return f"items disagree on {field!r}: " + "; ".join(parts)


def summarize(index: dict[str, Any], chunk_dirs: Sequence[str | Path | None], checks: list[str],
              states: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Counts by status, the failed items' keys, and the --check disagreements."""
    counts: dict[str, int] = {}
    failed: list[str] = []
    seen: dict[str, dict[str, list[str]]] = {f: {} for f in checks}
    for record in records(index, chunk_dirs, states):
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        if record["status"] != "success":
            if record["status"] not in ("queued", "running", "skipped"):
                failed.append(record["key"])
            continue
        if checks:
            try:
                value = json.loads(record["output"])
            except ValueError:
                continue  # only JSON outputs are checked
            if isinstance(value, dict):
                for f in checks:
                    if f in value:
                        seen[f].setdefault(json.dumps(value[f]), []).append(record["key"])
    problems = [disagreements(f, v) for f, v in seen.items() if len(v) > 1]
    summary = {"items": len(index["keys"]), "counts": counts, "failed": failed[:1000],
               "failed_total": len(failed), "disagreements": problems}
    return summary, problems


def gather(index_path: Path, chunk_dirs: Sequence[str | Path | None], checks: list[str],
           here: Path, emit: Emit, complain: Emit) -> int:
    index = json.loads(index_path.read_text(encoding="utf-8"))
    summary, problems = summarize(index, chunk_dirs, checks)
    (here / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    bad = summary["failed_total"]
    if bad:
        shown = ", ".join(summary["failed"][:10]) + (" …" if bad > 10 else "")
        complain(f"ERROR: {bad:,d} of {summary['items']:,d} items failed: {shown}")
    for problem in problems:
        complain(f"ERROR: {problem}")
    return 1 if bad or problems else 0


@functools.cache  # built once per process: an in-process `run` of one item parses often
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sheepdog.mapping.step")
    sub = parser.add_subparsers(dest="op", required=True)
    for op in ("run", "run-many"):
        run = sub.add_parser(op)
        run.add_argument("spec")
        run.add_argument("--cwd", default=None)
        run.add_argument("--input", nargs=2, action="append", default=[],
                         metavar=("NAME", "PATH"))
    gat = sub.add_parser("gather")
    gat.add_argument("index")
    gat.add_argument("--check", action="append", default=[])
    gat.add_argument("chunks", nargs="*")
    return parser


def _say(line: str) -> None:
    print(line, flush=True)


def _complain(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _args(argv: list[str] | None) -> argparse.Namespace:
    """The step's arguments. A `run` as map writes it (SPEC, then --cwd DIR and --input
    NAME PATH) is read directly: it starts every one-item piece, and argparse cost more
    than a `true` item; anything else, or anything unusual, goes to argparse."""
    given = list(argv or [])
    if given[:1] != ["run"] or len(given) < 2 or given[1].startswith("-"):
        return _parser().parse_args(argv)
    args = argparse.Namespace(op="run", spec=given[1], cwd=None, input=[])
    rest = given[2:]
    while rest:
        width = {"--cwd": 2, "--input": 3}.get(rest[0], 0)
        values = rest[1:width]
        if not width or len(values) < width - 1 or any(v.startswith("-") for v in values):
            return _parser().parse_args(argv)
        if width == 2:
            args.cwd = values[0]
        else:
            args.input.append(values)
        rest = rest[width:]
    return args


def main(argv: list[str] | None = None, workdir: Path | None = None, emit: Emit = _say,
         complain: Emit = _complain, stop: threading.Event | None = None) -> int:
    args = _args(argv)
    here = workdir or Path.cwd()
    try:
        if args.op in ("run", "run-many"):
            # short specs travel inline in the argv, long ones as a staged file
            spec = json.loads(args.spec if args.spec.startswith("{")
                              else Path(args.spec).read_text(encoding="utf-8"))
            run_chunk(spec, dict(args.input), args.cwd, here, emit, complain,
                      stop or threading.Event(), light=args.op == "run-many")
            return 0
        return gather(Path(args.index), args.chunks, args.check, here, emit, complain)
    except (SheepdogError, OSError, ValueError, KeyError) as e:
        complain(f"ERROR: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
