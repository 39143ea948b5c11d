"""Schemathesis against the real server's /openapi.json: a few hundred generated requests, valid
and invalid, over real HTTP. No route answers 500, and every refusal names its field (issue 23).

The server's limits are tight (64 px, 2 steps, batch and n_iter 1) so that the valid jobs the
fuzzer sends cost milliseconds; the limits are server policy, so a request cannot raise them.
"""
from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.api_server import start_server

EXAMPLES_PER_ROUTE = 10  # x ~40 routes x 2 modes: a few hundred cases


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, tiny_checkpoints):
    srv = start_server(tmp_path_factory.mktemp("fuzz"), {"tiny": tiny_checkpoints["sd1"]},
                       max_size=64, max_steps=2, max_batch_size=1, max_n_iter=1)
    yield srv
    srv.stop()


def field_named(detail) -> bool:
    """A 4xx body names what was wrong: a field-located list (FastAPI) or a message."""
    if isinstance(detail, list):
        return all(isinstance(item, dict) and item.get("loc") and item.get("msg") for item in detail)
    return isinstance(detail, str) and len(detail) > 3


def check_route(operation, mode: GenerationMode, base_url: str) -> int:
    """Sends EXAMPLES_PER_ROUTE generated requests to one route; returns how many were sent."""
    sent = []

    @given(operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def send(case):
        response = case.call(base_url=base_url, timeout=120)
        sent.append(response.status_code)
        where = (case.method, case.path, mode.value, response.status_code, response.text[:400])
        assert response.status_code < 500, where
        if 400 <= response.status_code < 500 and "json" in response.headers.get("content-type", ""):
            assert field_named(response.json().get("detail")), where
        if case.path.startswith("/api/v1/queue/"):  # a generated pause must not stall the jobs sent after it
            for body in ({"all": True}, {}):
                httpx.post(base_url + "/api/v1/queue/resume", json=body, timeout=30)

    try:
        send()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE, operation.label  # a route without inputs has no invalid form
    return len(sent)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_route_answers_500(fuzz_server, mode):
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 30  # the A1111 API, the jobs API and the extension routes
    sent = sum(check_route(op, mode, fuzz_server.url) for op in operations)
    print(f"{mode.value}: {sent} requests over {len(operations)} routes")
    assert sent >= 100, sent  # routes without inputs give one case; the rest give up to EXAMPLES_PER_ROUTE


def test_the_fuzzed_server_still_serves(fuzz_server):
    assert httpx.get(fuzz_server.url + "/api/v1/health", timeout=30).status_code == 200
