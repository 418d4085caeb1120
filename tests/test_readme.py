"""The README's first-hour commands, typed as a newcomer types them: the curl upload
against a real `sheepdog serve`, and the `map` example."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

from conftest import ROOT, free_port, sheepdog, wait_for

README = (ROOT / "README.md").read_text()


def _block(starting: str, ending: str) -> str:
    """The README's command that starts with `starting`, through the line with `ending`."""
    lines = README.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(starting))
    last = next(i for i in range(first, len(lines)) if ending in lines[i])
    return textwrap.dedent("\n".join(lines[first:last + 1]))


def test_the_curl_upload_of_the_first_hour_runs_a_scan(env, tmp_path):
    assert shutil.which("curl"), "curl is not installed"
    token = "sd_readme-token"
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "sheepdog", "serve", "--bind", f"127.0.0.1:{port}",
         "--local-workers", "2"], env=dict(env, SHEEPDOG_API_TOKENS=token),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return urllib.request.urlopen(f"{base}/health", timeout=1).status == 200
        except OSError:
            return False

    try:
        wait_for(up, 30, every=0.1, what="sheepdog serve")
        command = _block("curl -H", "/jobs").replace("http://127.0.0.1:8080", base)
        r = subprocess.run(["bash", "-c", command], cwd=ROOT / "sheepdog" / "examples" / "bxd",
                           env=dict(env, TOKEN=token), capture_output=True, text=True,
                           timeout=120)
        answer = json.loads(r.stdout)
        assert answer["status"] == "queued" and answer["read_token"], r.stdout + r.stderr

        def ended() -> dict | None:
            request = urllib.request.Request(f"{base}/jobs/{answer['id']}",
                                             headers={"Authorization": f"Bearer {token}"})
            job = json.loads(urllib.request.urlopen(request, timeout=10).read())
            return job if job["status"] in ("success", "error") else None

        job = wait_for(ended, 300, every=0.5, what="the uploaded scan to end")
        assert job["status"] == "success", job
        page = urllib.request.urlopen(base + answer["urls"]["page"], timeout=10).read()
        assert b"gemma-loco" in page  # the shareable link opens the job's page
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_map_example_of_the_first_hour(env, tmp_path):
    command = _block("sheepdog map --range 1:1000", "--")
    argv = ["bash", "-c", command.replace("sheepdog ", f"{sys.executable} -m sheepdog ", 1)]
    started = time.monotonic()
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in
               (tmp_path / "results" / "squares" / "items.jsonl").read_text().splitlines()]
    assert [int(rec["output"]) for rec in records] == [n * n for n in range(1, 1001)]
    assert time.monotonic() - started < 300
    assert sheepdog("list", env=env).stdout.splitlines()[0].split()[:3] == [
        "JOB", "STATUS", "EXIT"]  # `list` says what its columns are


def test_the_precompute_example_of_the_first_hour_finds_a_peak(env, tmp_path):
    """The three lines as the README gives them: the run, the region query, one trait."""
    said = []
    for start in ("sheepdog run gemma-precompute --example", "sheepdog precompute hits",
                  "sheepdog precompute show"):
        command = _block(start, start).split("#")[0].strip()
        r = subprocess.run(["bash", "-c", command.replace("sheepdog ",
                                                          f"{sys.executable} -m sheepdog ", 1)],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (command, r.stderr[-2000:])
        said.append(r.stdout)
    assert said[1].split("\t")[:3] == ["liver", "rs8253327", "1"]  # its peak on chr 1
    assert said[2].startswith("liver: n 67; top rs8253327 chr 1")
