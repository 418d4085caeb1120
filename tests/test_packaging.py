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
    """A wheel built from the source tree, installed alone into a new virtualenv (its
    dependencies come from the machine's site-packages, as a distribution would give
    them; sheepdog itself only from the wheel)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(work / "dist"), str(ROOT)], check=True, cwd=work)
    wheel = next((work / "dist").glob("sheepdog-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps",
                    "--ignore-installed",
                    str(wheel)], check=True, cwd=work)
    return wheel, venv, work


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
