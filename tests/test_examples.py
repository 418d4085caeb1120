"""The runnable examples under examples/ (the seeds' systems), run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT

EXAMPLES = ROOT / "examples"


def _run(argv: list[str], env: dict[str, str], cwd, timeout: float = 180):
    return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_scatter_gather_checks_agreement_and_keeps_request_order(env, tmp_path):
    here = EXAMPLES / "scatter_gather"
    r = _run(["bash", str(here / "run.sh"), str(here / "records.csv"), str(tmp_path / "ok")],
             env, tmp_path)
    assert r.returncode == 0, r.stderr
    answers = json.loads((tmp_path / "ok" / "predictions.json").read_text())
    ids = [line.split(",")[0] for line in (here / "records.csv").read_text().split()[1:]]
    assert [a["id"] for a in answers] == ids  # request order, every record once
    mixed = _run(["bash", str(here / "run.sh"), str(here / "records_mixed.csv"),
                  str(tmp_path / "mixed")], env, tmp_path)
    assert mixed.returncode != 0
    assert "items disagree on 'species_actual'" in mixed.stderr
    assert '"mouse" in item r07' in mixed.stderr


def test_task_farm_survives_a_killed_worker_with_every_task_answered_once(env, tmp_path):
    r = _run([sys.executable, str(EXAMPLES / "task_farm" / "farm.py"), "120"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "120 tasks answered, each once; worker" in r.stdout
    assert "was killed halfway" in r.stdout and "worker None" not in r.stdout


def test_tiles_merge_back_to_the_direct_computation(env, tmp_path):
    r = _run(["bash", str(EXAMPLES / "tiles" / "run.sh"), str(tmp_path / "out"), "6000", "8",
              "25"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "5976 windows from the tiles, equal to the direct computation" in r.stdout
    assert "success" in r.stdout and "8/9 pieces" not in r.stdout


def test_precalc_samples_validates_and_serves_by_key(env, tmp_path):
    r = _run(["bash", str(EXAMPLES / "precalc" / "run.sh"), str(tmp_path / "out"), "12"],
             env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "12 predictions valid" in r.stdout
    served = r.stdout.split("served by key:")[1]
    record = json.loads(served[served.index("{"):served.index("}\n") + 1])
    assert record["status"] == "success" and json.loads(record["output"])["id"] == record["key"]
    assert "no such item 'EOS9999'" in r.stderr
