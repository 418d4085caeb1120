"""Every input parser, fuzzed: a result or a clear error naming the file, line or field,
never a traceback or a 5xx. A fixed seed and a bounded count here; bench/fuzz.py runs
the same properties longer."""

from __future__ import annotations

import pytest
from fuzz_cases import (
    annotation_and_geno,
    covariates,
    geno_file,
    job_bodies,
    phenotypes,
    table_text,
    trait_table,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from web import create_app

CI = settings(max_examples=150, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@CI
@given(table_text(), table_text())
def test_bimbam_genotypes_and_annotation(anno, geno):
    annotation_and_geno(anno, geno)


@CI
@given(table_text(), st.integers(1, 5), st.integers(1, 3))
def test_bimbam_phenotypes(data, individuals, column):
    phenotypes(data, individuals, column)


@CI
@given(table_text(), st.integers(1, 5))
def test_bimbam_covariates(data, individuals):
    covariates(data, individuals)


@CI
@given(table_text())
def test_gn_geno_files(data):
    geno_file(data)


@CI
@given(table_text())
def test_trait_tables(data):
    trait_table(data)


@pytest.fixture()
def client(redis_server, home, conn, queue):
    app = create_app({"TESTING": True, "SETTINGS": {
        "redis_url": redis_server.url, "home": home, "api_tokens": ("fuzz",), "queue": queue}})
    return app.test_client()


@CI
@given(body=job_bodies())
def test_post_jobs_bodies_never_get_a_5xx(client, body):
    r = client.post("/jobs", json=body, headers={"Authorization": "Bearer fuzz"})
    assert r.status_code < 500, (body, r.get_json())
    if r.status_code >= 400:
        answer = r.get_json()
        assert answer["error"] and answer["status"] == r.status_code
        assert answer.get("field"), answer  # names what is wrong
