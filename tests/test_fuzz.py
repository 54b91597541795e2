"""Property-based fuzzing of the live server from its own OpenAPI schema (schemathesis).

Every generated request, valid or not, must get a documented status and content type, a body
matching the documented schema, never a 5xx, and schema-invalid input must be refused with 4xx.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)

from conftest import live_server, server_env

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server(tiny_echo_dir, tiny_fish_dir, voice_dir, tmp_path_factory):
    # bounded work per request: at most one chunk of at most 640 frames
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_CHUNKS="1", ECHO_MAX_INPUT_CHARS="300",
                     ECHO_REQUEST_TIMEOUT="0")
    with live_server(tmp_path_factory, "fuzz", env) as live:
        yield live


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_route_honours_its_schema(case, fuzz_server):
    case.call_and_validate(base_url=fuzz_server.url, checks=CHECKS, timeout=120)
