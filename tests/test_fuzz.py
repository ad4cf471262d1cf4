"""Schemathesis against raymix's own OpenAPI document (/openapi.json, request bodies included):
generated requests, valid and invalid, never get a 5xx. Bounded: a few examples per operation and
a short context, so every generation is short."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.cluster_harness import Raymix, free_port, ray_cluster


@pytest.fixture(scope="module")
def api_schema():
    with ray_cluster():
        rm = Raymix(free_port())
        rm.deploy(expert_shards=0, max_model_len=48, kv_cache_memory_mb=16, request_timeout_s=20)  # the API's
        yield schemathesis.openapi.from_url(f"{rm.url}/openapi.json")


def test_no_server_errors(api_schema):
    # (schemathesis' own pytest plugin does not load under this pytest: drive its strategies here)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 8
    for op in operations:

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case) -> None:
            response = case.call(timeout=60)
            assert response.status_code < 500, (
                f"{case.method} {case.path}: {response.status_code} {response.text[:300]}"
            )

        fuzz()


def test_openapi_document_lists_the_api(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/tokenize"} <= paths
    body = api_schema.raw_schema["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"]["$ref"].endswith("ChatCompletionRequest")
