"""Property-based fuzzing of the app from its own OpenAPI schema (schemathesis), in process: the
app is called as ASGI, its lifespan (which loads the models) run once by schemathesis.

Every generated request, valid or not, must get a documented status and content type, a body
matching the documented schema, never a 5xx, and schema-invalid input must be refused with 4xx.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                 response_schema_conformance, status_code_conformance)
from schemathesis.python.asgi import shutdown_lifespans

from conftest import server_env, settings_from_env

pytestmark = pytest.mark.slow
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_app(tiny_echo_dir, tiny_fish_dir, voice_dir):
    from api_server import create_app

    # bounded work per request: at most one chunk of at most 640 frames
    env = server_env(tiny_echo_dir, tiny_fish_dir, voice_dir, ECHO_MAX_CHUNKS="1", ECHO_MAX_INPUT_CHARS="300",
                     ECHO_REQUEST_TIMEOUT="0")
    app = create_app(settings_from_env(env))
    yield app
    shutdown_lifespans()  # the lifespan schemathesis started: the worker stops, the models go


@pytest.fixture(scope="module")
def api_schema(fuzz_app):
    loaded = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)  # starts the app's lifespan
    assert fuzz_app.state.service.ready.wait(120), fuzz_app.state.service.unready_reason()
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_every_route_honours_its_schema(case):
    case.call_and_validate(checks=CHECKS)
