"""Request parameters declared once (sheepdog.params): parsing, bounds, schema, options."""

from __future__ import annotations

import click
import click.testing
import pytest

from sheepdog.errors import ConfigError, FieldError
from sheepdog.gemma.precompute.build import PRECOMPUTE_PARAMS
from sheepdog.params import Param, Params

PARAMS = Params(Param("maf", float, 0.01, "minor allele frequency", minimum=0, below=0.5),
                Param("test", str, "lrt", "the test", choices=("lrt", "wald")),
                Param("n", int, None, "a column", minimum=1, flags=("-n",)),
                Param("names", list, [], "ids", cli=False),
                Param("force", bool, False, "again", recorded=False))


@pytest.mark.parametrize("raw,field,problem", [
    ({"maf": 0.5}, "params.maf", "must be below 0.5"),
    ({"maf": -1}, "params.maf", "must be at least 0"),
    ({"maf": "x"}, "params.maf", "must be a number"),
    ({"test": "score"}, "params.test", "must be one of lrt, wald"),
    ({"n": 1.5}, "params.n", "must be a whole number"),
    ({"n": True}, "params.n", "must be a whole number"),
    ({"names": ["a", 1]}, "params.names", "must be a list of strings"),
    ({"force": "yes"}, "params.force", "must be true or false"),
    ({"window": 3}, "params.window", "unknown parameter; known: maf, test, n, names, force"),
    ([1], "params", "must be an object"),
])
def test_a_bad_value_is_a_400_naming_the_parameter(raw, field, problem):
    with pytest.raises(FieldError) as e:
        PARAMS.parse(raw)
    assert (e.value.field, e.value.problem, e.value.http_status) == (field, problem, 400)


def test_good_values_are_typed_and_defaults_filled_in():
    assert PARAMS.parse({"maf": 0, "n": 2.0}) == {"maf": 0.0, "test": "lrt", "n": 2,
                                                 "names": [], "force": False}
    assert PARAMS.record(PARAMS.parse(None)) == {"maf": 0.01, "test": "lrt", "n": None,
                                                "names": []}


def test_the_command_line_and_the_schema_come_from_the_same_declaration():
    @click.command()
    @PARAMS.options
    def run(**kw):
        PARAMS.check(kw)
        click.echo(repr(sorted(kw.items())))

    runner = click.testing.CliRunner()
    assert "--maf" in runner.invoke(run, ["--help"]).output
    assert "--names" not in runner.invoke(run, ["--help"]).output  # not an option
    out = runner.invoke(run, ["-n", "3", "--force", "--test", "wald"])
    assert out.exit_code == 0 and "('n', 3)" in out.output and "('force', True)" in out.output
    bad = runner.invoke(run, ["--maf", "0.7"])
    assert isinstance(bad.exception, ConfigError) and "--maf must be below 0.5" in str(
        bad.exception)
    schema = PARAMS.schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["maf"] == {"type": "number", "description":
                                           "minor allele frequency", "default": 0.01,
                                           "minimum": 0, "exclusiveMaximum": 0.5}
    assert schema["properties"]["test"]["enum"] == ["lrt", "wald"]


def test_the_precompute_declares_what_its_requests_take():
    assert set(PRECOMPUTE_PARAMS.by_name) == {"traits", "sample", "seed", "maf", "test",
                                              "threshold", "min_values", "batch_size",
                                              "force"}
    with pytest.raises(FieldError, match="must be at least 2"):
        PRECOMPUTE_PARAMS.parse({"min_values": 1})


# Added to the scans' declaration before anything reads it, in every Python process the
# check starts (the CLI, the web app, and the child that prepares a request): the one
# place a new parameter is written.
ADD_WINDOW = """
import sheepdog.gemma.scan.build as build
from sheepdog.params import Param
build.SCAN_PARAMS = build.SCAN_PARAMS.plus(
    Param("window", int, 5, "A made-up window, in SNPs.", minimum=1, maximum=10))
"""
THROUGH_THE_WEB = """
import json, sys, yaml
from pathlib import Path
from web import create_app
home, url, bxd = sys.argv[1:4]
client = create_app({"TESTING": True, "SETTINGS": {"redis_url": url, "home": Path(home),
    "api_tokens": ("t",), "input_roots": (bxd,)}}).test_client()
auth = {"Authorization": "Bearer t"}
doc = yaml.safe_load(client.get("/openapi.yaml").data)
body = {"workflow": "gemma-loco", "inputs": {"geno": bxd + "/BXD_geno.txt.gz",
        "pheno": bxd + "/BXD_pheno.txt", "anno": bxd + "/BXD_snps.txt"}}
out = {"schema": doc["components"]["schemas"]["GemmaLocoJob"]["properties"]["params"]}
for value in (11, 7):
    r = client.post("/jobs", headers=auth, json={**body, "params": {"window": value}})
    out[str(value)] = [r.status_code, r.get_json()]
print(json.dumps(out))
"""


def test_a_parameter_added_in_one_place_reaches_help_openapi_requests_and_the_record(
        env, conn, tmp_path):
    import json
    import subprocess
    import sys

    from conftest import BXD, sheepdog

    from sheepdog import store

    (tmp_path / "sitecustomize.py").write_text(ADD_WINDOW)
    env = dict(env, PYTHONPATH=str(tmp_path))
    shown = sheepdog("run", "gemma-loco", "--help", env=env)
    assert "--window" in shown.stdout and "A made-up window, in SNPs." in shown.stdout
    bad = sheepdog("run", "gemma-loco", "--example", "--window", "11", env=env)
    assert bad.returncode == 2 and "--window must be at most 10" in bad.stderr
    web = subprocess.run([sys.executable, "-c", THROUGH_THE_WEB, env["SHEEPDOG_HOME"],
                          env["SHEEPDOG_REDIS_URL"], str(BXD)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert web.returncode == 0, web.stderr[-2000:]
    out = json.loads(web.stdout)
    assert out["schema"]["properties"]["window"] == {
        "type": "integer", "description": "A made-up window, in SNPs.", "default": 5,
        "minimum": 1, "maximum": 10}
    status, answer = out["11"]
    assert status == 400, (answer, web.stderr[-3000:])
    assert answer["field"] == "params.window"
    assert answer["error"] == "must be at most 10"
    status, answer = out["7"]
    assert status == 202, answer
    job = store.get_job(conn, answer["id"])
    assert job.params["options"]["window"] == 7 and job.params["options"]["maf"] == 0.01
    plain = sheepdog("run", "gemma-loco", "--help", env={**env, "PYTHONPATH": ""})
    assert "--window" not in plain.stdout  # the parameter came from that one place


def test_maf_is_declared_once_and_becomes_gemmas_flag_in_one_place():
    """The request field in one declaration; GEMMA's `-maf` named where GEMMA's flags are
    (what a scan passes on, and what it refuses in the free-form flags)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    field = re.compile(r"(?<![-\w])maf\b")
    places = [str(p.relative_to(root)) for d in ("sheepdog", "web") for p in
              sorted((root / d).rglob("*.py")) if field.search(p.read_text())]
    assert places == ["sheepdog/gemma/scan/build.py"], places
    gemma_flag = re.compile(r"[\"']-maf[\"']")
    flagged = [str(p.relative_to(root)) for d in ("sheepdog", "web") for p in
               sorted((root / d).rglob("*.py")) if gemma_flag.search(p.read_text())]
    assert len(flagged) <= 2, flagged
