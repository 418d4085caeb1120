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


def test_the_readme_starts_with_the_two_commands_ci_types():
    """README: set-up first, tests second; .ci/run ends by typing exactly those two,
    with only the distribution's python3 on PATH."""
    readme = (ROOT / "README.md").read_text()
    first_two = _commands(readme)[:2]
    assert first_two == ["bash deploy/quickstart.sh", ".venv/bin/python -m pytest -q tests"]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert [line.strip() for line in ci[-2:]] == first_two
    path = next(line for line in ci if line.startswith("export PATH="))
    assert "pyenv" not in path and path.split("=", 1)[1].startswith("/usr/local/sbin:")
    quickstart = (ROOT / "deploy" / "quickstart.sh").read_text()
    assert "-m venv" in quickstart and "'.[test]'" in quickstart
