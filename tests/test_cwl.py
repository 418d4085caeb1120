"""CWL through sheepdog: cwltool as a library builds each tool invocation, sheepdog's
queue and workers run it (sheepdog.cwlrun); the conformance suite through
`sheepdog-cwl-runner` with cwltest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, wait_for

from sheepdog import logs, store

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cwl"
SUBSET = Path(__file__).resolve().parent / "cwl-conformance"
RUNNER = [sys.executable, "-m", "sheepdog.cwlrun"]


def _cwl_jobs(conn) -> list:
    """The CWL runs' jobs, newest first."""
    return [j for j in store.list_jobs(conn, 100) if j.workflow == "cwl"]


def _slow_example(tmp_path: Path, seconds: float) -> Path:
    """A copy of the example whose every count first sleeps `seconds`."""
    here = tmp_path / "cwl"
    shutil.copytree(EXAMPLE, here)
    tool = (here / "wc-tool.cwl").read_text()
    (here / "wc-tool.cwl").write_text(tool.replace(
        "baseCommand: [wc, -w]", f"baseCommand: [sh, -c, 'sleep {seconds}; wc -w']"))
    return here


def test_a_scatter_runs_each_invocation_as_a_piece_on_both_workers(env, conn, workers,
                                                                   tmp_path):
    """The example's scatter: six `wc` invocations and their sum, seven pieces of one
    job, taken by two workers (both ran some); the output object names the files, and
    they hold the counts."""
    for name in ("w1", "w2"):
        workers.start("--name", name, "-j", "2")
    wait_for(lambda: conn.scard("sheepdog:workers") >= 2, 20, what="two workers")
    out = tmp_path / "out"
    done = subprocess.run([*RUNNER, "--quiet", "--outdir", str(out), "wc-scatter.cwl",
                           "job.yml"], cwd=EXAMPLE, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    counts = [int(Path(f["path"]).read_text()) for f in result["counts"]]
    assert counts == [3, 6, 9, 12, 15, 18]
    assert int(Path(result["total"]["path"]).read_text()) == sum(counts)
    assert Path(result["total"]["path"]).parent == out
    job, = _cwl_jobs(conn)
    assert job.status == "success" and job.total == job.done == 7
    tasks = store.job_tasks(conn, job.id)
    assert len(tasks) == 7 and all(t.status == "success" for t in tasks)
    assert {t.worker for t in tasks} == {"w1", "w2"}


def test_sheepdog_run_cwl_says_how_it_ended(env, conn, workers, tmp_path):
    """`sheepdog run cwl`: the output object on stdout and exit 0; a tool that fails is
    exit 1 (CWL's permanentFail) with the job's piece recorded as failed."""
    workers.start("-j", "2")
    ok = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                         "--outdir", str(tmp_path / "ok"), str(EXAMPLE / "wc-tool.cwl")],
                        input="", capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode != 0  # no job order: cwltool names the missing input
    assert "text" in ok.stderr
    tool = tmp_path / "fails.cwl"
    tool.write_text("cwlVersion: v1.2\nclass: CommandLineTool\nbaseCommand: 'false'\n"
                    "inputs: []\noutputs: []\n")
    failed = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                             "--outdir", str(tmp_path / "f"), str(tool)],
                            capture_output=True, text=True, env=env, timeout=60)
    assert failed.returncode == 1, failed.stderr[-2000:]
    second, first = _cwl_jobs(conn)
    assert first.status == "error" and "exit code" in first.error  # no piece ever ran
    assert store.job_tasks(conn, first.id) == []
    assert second.status == "error"
    task, = store.job_tasks(conn, second.id)
    assert task.exit_code == 1 and task.argv[-1] == "false"


def test_a_tool_that_asks_for_a_container_runs_from_the_host_or_is_refused(env, conn, workers,
                                                                          tmp_path):
    """DockerRequirement, as cwltool's --no-container: a hint's tool runs from the host,
    a required container is refused with CWL's exit code for an unsupported requirement
    (33); SHEEPDOG_CWL_CONTAINERS=refuse refuses the hint's too, naming the setting, and
    no piece ran. A setting that is neither is refused, naming it."""
    workers.start("-j", "2")

    def tool(where: str) -> Path:
        path = tmp_path / f"{where}.cwl"
        path.write_text(f"cwlVersion: v1.2\nclass: CommandLineTool\n{where}:\n"
                        "  DockerRequirement: {dockerPull: 'debian:12'}\n"
                        "baseCommand: [echo, hi]\nstdout: hi.txt\ninputs: []\n"
                        "outputs:\n  hi: {type: stdout}\n")
        return path

    def run(path: Path, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RUNNER, "--quiet", "--outdir", str(tmp_path / "o"), str(path)],
                              env=dict(env, **more), capture_output=True, text=True, timeout=60)

    hinted = run(tool("hints"))
    assert hinted.returncode == 0, hinted.stderr[-2000:]
    assert Path(json.loads(hinted.stdout)["hi"]["path"]).read_text() == "hi\n"
    assert run(tool("requirements")).returncode == 33
    refused = run(tool("hints"), SHEEPDOG_CWL_CONTAINERS="refuse")
    assert refused.returncode == 33, refused.stderr[-2000:]
    assert "SHEEPDOG_CWL_CONTAINERS=refuse" in refused.stderr
    newest = _cwl_jobs(conn)[0]
    assert newest.status == "error" and store.job_tasks(conn, newest.id) == []
    bad = run(tool("hints"), SHEEPDOG_CWL_CONTAINERS="maybe")
    assert bad.returncode == 1 and "cwl_containers must be host or refuse" in bad.stderr


def test_an_unchanged_invocation_is_not_run_again(env, conn, workers, tmp_path):
    """`sheepdog run cwl` caches each invocation by its command line, inputs and
    requirements: the same run again makes no piece at all and gives the same counts;
    with one text changed, only its count and the sum run again."""
    workers.start("-j", "2")
    here = tmp_path / "cwl"
    shutil.copytree(EXAMPLE, here)

    def run(n: int) -> tuple[list[int], int]:
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                               "--outdir", str(tmp_path / f"out{n}"), "wc-scatter.cwl",
                               "job.yml"], cwd=here, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        counts = [int(Path(f["path"]).read_text()) for f in result["counts"]]
        return counts, len(store.job_tasks(conn, _cwl_jobs(conn)[0].id))

    assert run(1) == ([3, 6, 9, 12, 15, 18], 7)
    assert run(2) == ([3, 6, 9, 12, 15, 18], 0)
    (here / "text3.txt").write_text("just four words here\n")
    assert run(3) == ([3, 6, 4, 12, 15, 18], 2)
    assert int((tmp_path / "out3" / "total.txt").read_text()) == 58


@pytest.mark.parametrize("how", ["in-place", "staged", "chunked"])
def test_required_conformance_tests_pass_through_sheepdog(env, conn, workers, how):
    """20 `required` tests of the CWL v1.2 suite (tests/cwl-conformance: those with small
    files), with cwltest, through sheepdog-cwl-runner and this test's workers; each run
    is a sheepdog job that succeeded. Staged: every invocation as it goes to an ssh host,
    Slurm or a pull worker (its files by content, its paths under one root, its outputs
    brought back). Chunked: every invocation cwltool could build on a worker built there
    (SHEEPDOG_CWL_BATCH=1). The whole suite: bench/cwl_conformance.py."""
    assert shutil.which("node") or shutil.which("nodejs"), \
        "nodejs runs CWL's JavaScript expressions: apt-get install nodejs"
    workers.start("-j", "4")
    runner = Path(sys.executable).parent / "sheepdog-cwl-runner"
    done = subprocess.run([str(Path(sys.executable).parent / "cwltest"), "--test",
                           "conformance_tests.yaml", "--tool", str(runner), "-j", "2",
                           "--timeout", "120"], cwd=SUBSET,
                          env=dict(env, **{"staged": {"SHEEPDOG_CWL_STAGE": "1"},
                                           "chunked": {"SHEEPDOG_CWL_BATCH": "1"}
                                           }.get(how, {})),
                          capture_output=True, text=True, timeout=600)
    said = done.stdout + done.stderr
    assert done.returncode == 0 and "All tests passed" in said, said[-4000:]
    ran = _cwl_jobs(conn)
    assert len(ran) >= 20 and all(j.status == "success" for j in ran), \
        [(j.id, j.status) for j in ran]
    steps = {t.argv[2] for j in ran for t in store.job_tasks(conn, j.id)}
    assert ("sheepdog.cwlstep" in steps) == (how == "staged")
    assert ("sheepdog.cwlbatch" in steps) == (how == "chunked")


def test_a_workflow_on_the_ssh_host_gives_the_local_runs_output_object(env, conn, workers,
                                                                       tmp_path):
    """`--backend shell --host testhost`: every invocation goes to the ssh host (a real
    sshd on loopback) staged by content, runs in its own scratch there, and its output
    directory comes back: the output object is the local run's, file for file. The same
    run again is served from the cache (the pieces' ids do not depend on the runner's
    temporary paths), and an edited input reruns only its count and the sum."""
    import sshd
    from test_shell_backend import CHANNELS

    host = sshd.start(tmp_path / "testhost", free_port(), channels=CHANNELS)
    try:
        env_ssh = dict(env, **host.env())
        workers.start("-j", "2", env=env_ssh)
        here = tmp_path / "cwl"
        shutil.copytree(EXAMPLE, here)

        def run(out: str, *backend: str) -> dict:
            done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                                   *backend, "--no-cache", "--outdir", str(tmp_path / out),
                                   "wc-scatter.cwl", "job.yml"], cwd=here, env=env_ssh,
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, (done.stderr[-2000:], [
                (t.name, t.error) for t in store.job_tasks(conn, _cwl_jobs(conn)[0].id)])
            return json.loads(done.stdout)

        def same(result: dict, out: str) -> list:
            files = [*result["counts"], result["total"]]
            assert all(Path(f["path"]).parent == tmp_path / out for f in files)
            return [(f["basename"], f["checksum"], f["size"]) for f in files]

        local = run("local")
        remote = run("remote", "--backend", "shell", "--host", "testhost")
        assert same(remote, "remote") == same(local, "local")
        job = _cwl_jobs(conn)[0]
        assert job.status == "success" and job.backend == "shell"
        tasks = store.job_tasks(conn, job.id)
        assert len(tasks) == 7 and {t.host for t in tasks} == {"testhost"}
        assert all(t.argv[2] == "sheepdog.cwlstep" for t in tasks)
        log = [line.text for _, line in logs.tail(conn, {job.id: "0-0"})]
        assert any("staged" in text and "to testhost" in text for text in log)
        again = run("again", "--backend", "shell", "--host", "testhost")
        assert same(again, "again") == same(local, "local")
        assert _cwl_jobs(conn)[0].cached == 7
        (here / "text3.txt").write_text("just four words here\n")
        edited = run("edited", "--backend", "shell", "--host", "testhost")
        assert int(Path(edited["total"]["path"]).read_text()) == 58
        assert _cwl_jobs(conn)[0].cached == 5
    finally:
        host.stop()


def test_a_pull_worker_runs_the_invocations_staged_by_content(env, conn, tmp_path):
    """A queue a pull worker serves (its own disk, no Redis, only the service over
    HTTPS): the run sees it and stages every invocation by content; all seven pieces
    ran on the pull worker and the counts came back right."""
    import tlscerts
    from pullservice import Service, add_token, kill, start_worker, worker_env

    from sheepdog.registration import live_workers

    certs = tlscerts.make(tmp_path / "certs")
    service_env = dict(env, SHEEPDOG_TOKENS_FILE=str(tmp_path / "tokens.json"))
    token = add_token(service_env, "worker", "cwl-worker")
    service = Service(service_env, f"127.0.0.1:{free_port()}", certs.server_cert,
                      certs.server_key, certs.ca)
    service.start()
    worker = start_worker(service.url, worker_env(env, tmp_path / "w", token), "-j", "2",
                          "--queue", env["SHEEPDOG_QUEUE"], ca=certs.ca)
    try:
        wait_for(lambda: any(w.get("pull") for w in live_workers(conn, env["SHEEPDOG_QUEUE"])),
                 30, what="the pull worker")
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                               "--no-cache", "--outdir", str(tmp_path / "out"),
                               "wc-scatter.cwl", "job.yml"], cwd=EXAMPLE, env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        result = json.loads(done.stdout)
        assert [int(Path(f["path"]).read_text()) for f in result["counts"]] == \
            [3, 6, 9, 12, 15, 18]
        assert int(Path(result["total"]["path"]).read_text()) == 63
        tasks = store.job_tasks(conn, _cwl_jobs(conn)[0].id)
        assert len(tasks) == 7 and all(t.worker.startswith("pull:") for t in tasks)
        assert all(t.argv[2] == "sheepdog.cwlstep" for t in tasks)
    finally:
        kill(worker)
        service.stop()


def test_a_resource_requirement_is_what_slurm_gives_the_tool(env, conn, workers, slurm,
                                                             tmp_path):
    """`--backend slurm` (a real single-node Slurm): a tool's ResourceRequirement becomes
    its piece's --cpus-per-task and --mem, and the tool, staged by content, sees them
    in the batch job it ran in; a tool without one gets the cluster's defaults."""
    env_slurm = dict(env, **slurm.env())
    workers.start("-j", "2", env=env_slurm)
    tool = tmp_path / "asks.cwl"
    tool.write_text("cwlVersion: v1.2\nclass: CommandLineTool\nrequirements:\n"
                    "  ResourceRequirement: {coresMin: 2, ramMin: 100}\n"
                    "baseCommand: [sh, -c, 'echo \"$SLURM_CPUS_PER_TASK $SLURM_MEM_PER_NODE\"']\n"
                    "stdout: asked.txt\ninputs: []\noutputs:\n  asked: {type: stdout}\n")
    plain = tmp_path / "plain.cwl"
    plain.write_text(tool.read_text().replace(  # (another command: not the other's cache)
        "requirements:\n  ResourceRequirement: {coresMin: 2, ramMin: 100}\n", "").replace(
        "\"']", "\"', plain]"))
    said = []
    for path in (tool, plain):
        done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                               "--backend", "slurm", "--outdir", str(tmp_path / path.stem),
                               str(path)], env=env_slurm, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        said.append(Path(json.loads(done.stdout)["asked"]["path"]).read_text().split())
        task, = store.job_tasks(conn, _cwl_jobs(conn)[0].id)
        assert task.backend == "slurm"
    assert said[0] == ["2", "100"]
    assert said[1] == []  # nothing asked: Slurm set neither
    task_asked = [t for j in _cwl_jobs(conn)[:2] for t in store.job_tasks(conn, j.id)]
    assert [(t.cores, t.ram_mb) for t in task_asked] == [(0, 0), (2, 100)]


def test_gemma_loco_written_in_cwl_equals_sheepdogs_own_scan(env, conn, workers, tmp_path):
    """examples/cwl/gemma-loco.cwl (GEMMA's own -gk -loco and -lmm 9 -loco per
    chromosome, a dotproduct scatter) through sheepdog: 40 pieces, and every SNP's
    printed af, beta, se and p_lrt equal `sheepdog run gemma-loco --example`'s."""
    from gemma_reference import read_assoc

    # A CWL tool runs in a clean environment: a machine's OPENBLAS_CORETYPE (this kind
    # sets one) reaches the native run's GEMMA and not the CWL one's, and its BLAS kernel
    # changes last digits. Both runs here get none.
    env = {k: v for k, v in env.items() if not k.startswith("OPENBLAS_")}
    workers.start("-j", "2", env=env)
    done = subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                           "--outdir", str(tmp_path / "cwl"), "gemma-loco.cwl",
                           "gemma-loco.yml"], cwd=EXAMPLE, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assoc = json.loads(done.stdout)["assoc"]
    assert len(assoc) == 20
    job = _cwl_jobs(conn)[0]
    assert job.status == "success" and job.total == 40
    ours: dict[str, dict[str, str]] = {}
    for f in assoc:
        ours.update(read_assoc(Path(f["path"])))
    native = subprocess.run([sys.executable, "-m", "sheepdog", "run", "gemma-loco",
                             "--example", "--out", str(tmp_path / "native")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert native.returncode == 0, native.stderr[-2000:]
    theirs = read_assoc(tmp_path / "native" / "assoc.txt")
    assert set(ours) == set(theirs) and len(ours) > 7000
    for rs, row in theirs.items():
        for column in ("af", "beta", "se", "p_lrt"):
            assert ours[rs][column] == row[column], (rs, column, ours[rs], row)


def test_a_run_stopped_half_way_runs_only_what_is_missing(env, conn, workers, tmp_path):
    """`sheepdog run cwl` killed (SIGKILL) after three of its six slow counts finished;
    the same command again runs only the counts that had not finished, and the sum,
    and its output object is the whole one."""
    import signal

    here = _slow_example(tmp_path, 0.6)
    workers.start("-j", "1")
    argv = [sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet", "--outdir",
            str(tmp_path / "out"), "wc-scatter.cwl", "job.yml"]
    first = subprocess.Popen(argv, cwd=here, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _cwl_jobs(conn) and sum(
            t.status == "success" for t in store.job_tasks(conn, _cwl_jobs(conn)[0].id)) >= 3,
                 60, what="three counts")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    again = subprocess.run(argv, cwd=here, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert [int(Path(f["path"]).read_text()) for f in result["counts"]] == \
        [3, 6, 9, 12, 15, 18]
    rerun = store.job_tasks(conn, _cwl_jobs(conn)[0].id)
    assert 2 <= len(rerun) <= 5  # the counts not finished before the kill, and the sum
    assert sorted(t.name for t in rerun)[-1] == "sum"


def test_a_staged_invocation_has_one_id_wherever_its_runner_put_its_files(tmp_path):
    """Staging by content (no Redis, no worker): the same tool on the same inputs in
    two runs' different temporary directories is the same piece; its paths are under
    one root, in a shell command line too; a secondary file stays beside its file; a
    different time limit, or the tool's WorkReuse false, is another piece."""
    from types import SimpleNamespace

    from cwltool.pathmapper import MapperEnt

    from sheepdog.cache import Cache
    from sheepdog.cwlrun import staged_task

    cache = Cache(tmp_path / "cache")

    def invocation(run: str, reuse: object = True, limit: int = 0):
        stage, out, tmp = (tmp_path / run / d for d in ("stg1", "out", "tmp"))
        for d in (stage, out, tmp):
            d.mkdir(parents=True)
        (stage / "a.bam").write_text("reads\n")
        (stage / "a.bam.bai").write_text("index\n")
        mapper = SimpleNamespace(items=lambda: {
            f"file://{stage}/{n}": MapperEnt(str(stage / n), str(stage / n), "File", True)
            for n in ("a.bam", "a.bam.bai")}.items())
        builder = SimpleNamespace(requirements=[{"class": "WorkReuse", "enableReuse": reuse}],
                                  hints=[], do_eval=lambda e: e == "$(true)")
        job = SimpleNamespace(pathmapper=mapper, builder=builder, tmpdir=str(tmp),
                              successCodes=[], temporaryFailCodes=[], permanentFailCodes=[])
        return staged_task(cache, "count", ["sh", "-c", f"samtools view {stage}/a.bam > "
                                            f"{out}/n.txt"], str(out),
                           {"HOME": str(out), "TMPDIR": str(tmp)}, [None, None, None], job,
                           limit)

    (one, roots), (two, _) = invocation("run1"), invocation("run2")
    assert one.id == two.id and one.cacheable
    spec = json.loads(one.argv[4])
    script = spec["argv"][2]
    assert str(tmp_path) not in json.dumps(spec)
    assert script.startswith("samtools view /sheepdog-cwl/in/") and \
        script.endswith(" > /sheepdog-cwl/out/n.txt")
    files = {rel: i for rel, i, _ in spec["files"]}
    bam = next(rel for rel in files if rel.endswith("/a.bam"))
    assert bam + ".bai" in files  # beside it
    assert roots["/sheepdog-cwl/out"] == str(tmp_path / "run1" / "out")
    assert spec["env"] == {"HOME": "/sheepdog-cwl/out", "TMPDIR": "/sheepdog-cwl/tmp"}
    assert invocation("run3", limit=5)[0].id != one.id
    assert invocation("run4", reuse=False)[0].id != invocation("run5", reuse=False)[0].id
    assert invocation("run6", reuse="$(true)")[0].id == one.id


def test_a_tool_that_updates_its_input_in_place_is_refused_when_staged(env, conn, workers,
                                                                       tmp_path):
    """InplaceUpdateRequirement: on local workers the tool updates the runner's file;
    staged (the host has a copy) it is refused with CWL's 33 naming the requirement,
    a step of a workflow too, rather than a run whose later steps read the old file."""
    workers.start("-j", "2")
    (tmp_path / "n.txt").write_text("1\n")
    tool = tmp_path / "bump.cwl"
    tool.write_text(
        "cwlVersion: v1.2\nclass: CommandLineTool\nrequirements:\n"
        "  InplaceUpdateRequirement: {inplaceUpdate: true}\n"
        "  InitialWorkDirRequirement: {listing: [{entry: $(inputs.n), writable: true}]}\n"
        "inputs: {n: File}\nbaseCommand: [sh, -c, 'echo 2 > n.txt']\noutputs: []\n")
    job = tmp_path / "job.yml"
    job.write_text("n: {class: File, path: n.txt}\n")
    flow = tmp_path / "flow.cwl"
    flow.write_text("cwlVersion: v1.2\nclass: Workflow\ninputs: {n: File}\noutputs: []\n"
                    "steps:\n  bump: {run: bump.cwl, in: {n: n}, out: []}\n")

    def run(path: Path, *more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sheepdog", "run", "cwl", "--quiet",
                               "--no-cache", *more, "--outdir", str(tmp_path / "o"),
                               str(path), str(job)], env=env, capture_output=True, text=True,
                              timeout=120)

    for path in (tool, flow):
        refused = run(path, "--stage")
        assert refused.returncode == 33, refused.stderr[-2000:]
        assert "InplaceUpdateRequirement" in refused.stderr
        assert (tmp_path / "n.txt").read_text() == "1\n"
    done = run(tool)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "n.txt").read_text() == "2\n"


_SAYS = """cwlVersion: v1.2
class: CommandLineTool
baseCommand: [sh, -c, 'test "$0" != bad && echo "$0 ${OMP_NUM_THREADS:-unset} $MINE"']
requirements:
  EnvVarRequirement: {envDef: {MINE: mine, OPENBLAS_NUM_THREADS: "7"}}
inputs:
  word: {type: string, inputBinding: {position: 1}}
stdout: said.txt
outputs:
  said: {type: stdout}
"""
_SAYS_ALL = """cwlVersion: v1.2
class: Workflow
requirements:
  ScatterFeatureRequirement: {}
inputs:
  words: string[]
outputs:
  said: {type: 'File[]', outputSource: say/said}
steps:
  say:
    run: says.cwl
    scatter: word
    in: {word: words}
    out: [said]
"""


def _said(result: dict) -> list[str]:
    return [Path(f["path"]).read_text() for f in result["said"]]


def test_a_large_scatter_is_built_on_the_workers_in_chunks(env, conn, workers, tmp_path):
    """A scatter of at least cwl_batch invocations of one tool goes as chunks, one per
    core serving the queue (two here), each built and run by cwltool on a worker: the
    example's output object is the one its seven pieces give, file for file (names,
    sizes, checksums), from three pieces (two chunks of three `wc`, the sum). A tool is
    told its one core (OMP_NUM_THREADS) unless it says otherwise (EnvVarRequirement), on
    either path."""
    workers.start("-j", "2")

    def run(batch: str, *argv: str, cwd: Path = EXAMPLE) -> tuple[dict, list]:
        done = subprocess.run([*RUNNER, "--quiet", "--outdir", str(tmp_path / f"o{batch}"),
                               *argv], cwd=cwd, env=dict(env, SHEEPDOG_CWL_BATCH=batch),
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout), store.job_tasks(conn, _cwl_jobs(conn)[0].id)

    def files(result: dict) -> list[tuple]:
        return [(f["basename"], f["size"], f["checksum"])
                for f in [*result["counts"], result["total"]]]

    one_each, pieces = run("0", "wc-scatter.cwl", "job.yml")
    assert len(pieces) == 7 and not any("sheepdog.cwlbatch" in t.argv for t in pieces)
    chunked, pieces = run("3", "wc-scatter.cwl", "job.yml")
    assert files(chunked) == files(one_each)
    assert [int(Path(f["path"]).read_text()) for f in chunked["counts"]] == [
        3, 6, 9, 12, 15, 18]
    chunks = [t for t in pieces if "sheepdog.cwlbatch" in t.argv]
    assert len(pieces) == 3 and len(chunks) == 2
    assert all(t.status == "success" for t in pieces)
    (tmp_path / "says.cwl").write_text(_SAYS)
    (tmp_path / "all.cwl").write_text(_SAYS_ALL)
    (tmp_path / "words.json").write_text(json.dumps({"words": ["a", "b", "c", "d"]}))
    for batch in ("0", "2"):
        result, _ = run(batch, "all.cwl", "words.json", cwd=tmp_path)
        assert _said(result) == [f"{w} 1 mine\n" for w in "abcd"]


def test_a_failing_invocation_in_a_chunk_fails_the_run_and_says_so(env, conn, workers,
                                                                    tmp_path):
    """One element of a chunked scatter fails (its tool exits 1): the run ends as
    cwltool's does (exit 1, permanentFail), cwltool's words about it from the worker on
    the runner's stderr, and the job in error."""
    workers.start("-j", "2")
    (tmp_path / "says.cwl").write_text(_SAYS)
    (tmp_path / "all.cwl").write_text(_SAYS_ALL)
    (tmp_path / "words.json").write_text(json.dumps({"words": ["a", "bad", "c", "d"]}))
    done = subprocess.run([*RUNNER, "--outdir", str(tmp_path / "o"), "all.cwl",
                           "words.json"], cwd=tmp_path, env=dict(env, SHEEPDOG_CWL_BATCH="2"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "[job say_2] exited with status: 1" in done.stderr  # said on the worker
    assert "[job say_2] completed permanentFail" in done.stderr
    job = _cwl_jobs(conn)[0]
    assert job.status == "error"
    assert any("sheepdog.cwlbatch" in t.argv for t in store.job_tasks(conn, job.id))


def test_a_killed_runners_job_ends_in_error_instead_of_running_for_ever(env, conn, workers,
                                                                        tmp_path):
    """`sheepdog-cwl-runner` killed (SIGKILL) while its invocations run: the job it held
    open for more pieces does not stay `running` — a worker's round of maintenance finds
    its runner gone and ends it in error, naming the runner; its pieces stop; nothing of
    it is left open."""
    import signal

    from sheepdog import keys

    here = _slow_example(tmp_path, 30)
    workers.start("-j", "2")
    runner = subprocess.Popen([*RUNNER, "--quiet", "--outdir", str(tmp_path / "out"),
                               "wc-scatter.cwl", "job.yml"], cwd=here, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        wait_for(lambda: _cwl_jobs(conn) and any(
            t.status == "running" for t in store.job_tasks(conn, _cwl_jobs(conn)[0].id)),
                 60, what="a running count")
        job = _cwl_jobs(conn)[0]
        assert conn.hexists(keys.open_jobs(), job.id)
    finally:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
    wait_for(lambda: store.get_job(conn, job.id).status == "error", 30,
             what="the job ended")
    ended = store.get_job(conn, job.id)
    assert f"pid {runner.pid}" in ended.error and "went away" in ended.error
    assert not conn.hexists(keys.open_jobs(), job.id)
    wait_for(lambda: all(t.status.final for t in store.job_tasks(conn, job.id)), 30,
             what="its pieces stopped")
