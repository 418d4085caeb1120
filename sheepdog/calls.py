"""The step that runs Python calls for `sheepdog.Executor` (and `sheepdog run python`):

    python -m sheepdog.calls call PAYLOAD [--setup MODULE:FUNCTION]

PAYLOAD is a pickled list of calls (function path, args, kwargs), base64 inline or a
staged file. Each call's value, or the exception it raised with its traceback, goes
into `result.pickle` in the same order; the step itself fails only when it cannot run
at all. A function is named `module:qualname`, or `/path/script.py:qualname` for one
defined in a script. `--setup` runs once per process (the worker's, when the local
backend runs this in-process) and its value reaches every call as `context=`.

Trust: unpickling runs code. Whoever can write the queue can run code as the workers,
exactly as with RQ. Only the standard library is imported here.
"""

from __future__ import annotations

import base64
import importlib
import importlib.util
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

IN_PROCESS = frozenset({"call"})
RESULT = "result.pickle"
_contexts: dict[str, Any] = {}
_contexts_lock = threading.Lock()
_scripts: dict[str, Any] = {}


def function_path(fn: Callable[..., Any]) -> str:
    """How a worker finds `fn` again: module:qualname (a script's file for __main__)."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or "<lambda>" in qualname or "<locals>" in qualname:
        raise TypeError(f"{fn!r} cannot be sent to a worker: give a function defined at "
                        "the top level of a module (not a lambda or a nested function)")
    if module == "__main__":
        script = getattr(sys.modules["__main__"], "__file__", None)
        if not script or not os.path.isfile(script):  # a session, or `python - <<EOF`
            raise TypeError(f"{qualname} is defined in an interactive session or a script "
                            "read from stdin; define it in a module or script file so "
                            "workers can import it")
        return f"{os.path.abspath(script)}:{qualname}"
    return f"{module}:{qualname}"


def _module(name: str) -> Any:
    if not name.endswith(".py"):
        return importlib.import_module(name)
    if name not in _scripts:  # a script, imported under its own name: no __main__ block
        spec = importlib.util.spec_from_file_location(f"sheepdog_script_{len(_scripts)}", name)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {name}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _scripts[name] = module
    return _scripts[name]


def resolve(path: str) -> Callable[..., Any]:
    """The function a path names."""
    module_name, _, qualname = path.rpartition(":")
    if not module_name or not qualname:
        raise ValueError(f"{path!r} is not MODULE:FUNCTION")
    target: Any = _module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return target


def context(setup: str) -> Any:
    """The setup's value, made once per process."""
    with _contexts_lock:
        if setup not in _contexts:
            _contexts[setup] = resolve(setup)()
        return _contexts[setup]


def encode(calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> bytes:
    return pickle.dumps(calls, protocol=pickle.HIGHEST_PROTOCOL)


def _portable(error: BaseException) -> BaseException:
    """The exception itself if it pickles, else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001  anything unpicklable is described instead
        return RuntimeError(f"{type(error).__module__}.{type(error).__qualname__}: {error}")


def run_calls(payload: bytes, setup: str | None) -> list[tuple[Any, ...]]:
    """Each call's ("ok", value, seconds) or ("raised", exception, traceback, seconds);
    the seconds let the Executor size its pieces."""
    calls = pickle.loads(payload)
    results: list[tuple[Any, ...]] = []
    ready: Any = None
    try:
        ready = context(setup) if setup else None
    except Exception as e:  # noqa: BLE001  every call reports the setup's failure
        failed = (_portable(e), "setup " + str(setup) + " failed:\n" + traceback.format_exc())
        return [("raised", *failed, 0.0) for _ in calls]
    for path, args, kwargs in calls:
        started = time.perf_counter()
        try:
            fn = resolve(path)
            value = fn(*args, **(dict(kwargs, context=ready) if setup else kwargs))
            pickle.dumps(value)  # an unpicklable value is this call's error, not the batch's
            results.append(("ok", value, time.perf_counter() - started))
        except Exception as e:  # noqa: BLE001  the caller gets it as the future's exception
            results.append(("raised", _portable(e), traceback.format_exc(),
                            time.perf_counter() - started))
    return results


def main(argv: list[str] | None = None, workdir: Path | None = None,
         emit: Callable[[str], None] = print, complain: Callable[[str], None] | None = None,
         stop: threading.Event | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    say = complain or (lambda s: print(s, file=sys.stderr, flush=True))
    if len(args) < 2 or args[0] != "call":
        say("usage: python -m sheepdog.calls call PAYLOAD [--setup MODULE:FUNCTION]")
        return 2
    payload_arg, rest = args[1], args[2:]
    setup = rest[1] if rest[:1] == ["--setup"] and len(rest) > 1 else None
    here = workdir or Path.cwd()
    try:
        payload = (base64.b64decode(payload_arg[4:]) if payload_arg.startswith("b64:")
                   else Path(payload_arg).read_bytes())
        results = run_calls(payload, setup)
        tmp = here / (RESULT + ".part")
        tmp.write_bytes(pickle.dumps(results, protocol=pickle.HIGHEST_PROTOCOL))
        tmp.rename(here / RESULT)
    except Exception as e:  # noqa: BLE001  a payload that cannot be read fails the piece
        say(f"ERROR: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
