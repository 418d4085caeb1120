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
