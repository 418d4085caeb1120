"""What one CWL tool invocation runs on a host that does not share the runner's disk
(an ssh host, a Slurm node, a pull worker): its files arrive by content, it runs in the
piece's scratch, and its output directory `out` goes back with the piece's output `code`.

The runner (sheepdog.cwlrun) writes the invocation with every path under one root,
ROOT (`/sheepdog-cwl/out` the output directory, `/sheepdog-cwl/tmp` its TMPDIR,
`/sheepdog-cwl/in/N/NAME` an input), so the same invocation has the same piece id on
any runner; here ROOT becomes the scratch directory. Standard library only.

    python3 -m sheepdog.cwlstep SCRATCH/code SPEC BLOB...

SPEC (JSON): argv, stdin/stdout/stderr, env, `files` ([path under ROOT, index of its
BLOB, writable]), `dirs` (empty directories to make), `success`/`fail` (the tool's
codes). The tool's exit code goes in `code`; the step exits 0 when cwltool will call
that code a success (so its outputs are kept), else with the code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

ROOT = "/sheepdog-cwl"


def _here(text: str, scratch: str) -> str:
    return text.replace(ROOT + "/", scratch + "/") if ROOT in text else text


def _stage(spec: dict[str, Any], blobs: list[str], scratch: str) -> None:
    for rel in ("out", "tmp", *spec.get("dirs", [])):
        os.makedirs(os.path.join(scratch, rel), exist_ok=True)
    for rel, index, writable in spec.get("files", []):
        target = os.path.join(scratch, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if writable or rel.startswith("out/"):  # the tool may change what is in its outdir
            shutil.copyfile(blobs[index], target)
        else:
            os.symlink(os.path.abspath(blobs[index]), target)


def _open(path: str | None, scratch: str, mode: str) -> Any:
    return open(_here(path, scratch), mode) if path else None  # noqa: SIM115


def _paths_back(path: str, scratch: str) -> None:
    """The output object a tool wrote itself names its files under ROOT again (the
    runner puts them where its own files are)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return
    with open(path, "w") as f:
        f.write(text.replace(scratch + "/", ROOT + "/"))


def run(spec: dict[str, Any], blobs: list[str], scratch: str) -> int:
    """Stage, run the tool, keep `out` and `code`; the step's exit code."""
    _stage(spec, blobs, scratch)
    argv = [_here(a, scratch) for a in spec["argv"]]
    env = dict(os.environ)  # the host's own PATH and environment, then the tool's
    env.update({k: _here(v, scratch) for k, v in spec.get("env", {}).items()})
    files = [_open(spec.get("stdin"), scratch, "rb"), _open(spec.get("stdout"), scratch, "wb"),
             _open(spec.get("stderr"), scratch, "wb")]
    try:
        code = subprocess.call(argv, cwd=os.path.join(scratch, "out"), env=env,
                               stdin=files[0] or subprocess.DEVNULL,
                               stdout=files[1], stderr=files[2])
    except OSError as e:
        print(f"sheepdog: {argv[0]}: {e.strerror or e}", file=sys.stderr)
        code = 127
    finally:
        for f in files:
            if f is not None:
                f.close()
    if code < 0:
        code = 128 - code
    _paths_back(os.path.join(scratch, "out", "cwl.output.json"), scratch)
    for rel in ("in", "tmp"):  # only `out` goes back
        shutil.rmtree(os.path.join(scratch, rel), ignore_errors=True)
    with open(os.path.join(scratch, "code"), "w") as f:
        f.write(str(code))
    ok = code in spec.get("success", []) or (code == 0 and 0 not in spec.get("fail", []))
    return 0 if ok else code


def main(argv: list[str]) -> int:
    return run(json.loads(argv[1]), argv[2:], os.path.dirname(os.path.abspath(argv[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
