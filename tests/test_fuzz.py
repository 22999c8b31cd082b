"""Fuzz the replica's HTTP contract (`openapi.yaml`) with schemathesis against a live cluster.

Every operation in the contract gets the examples, coverage and fuzzing phases (valid and
invalid inputs; a bounded, deterministic number of examples each) sent to replica 0 of a real
cluster, and every answer must pass:
  - not_a_server_error: no 5xx, except the documented 504 `peer_timeout` (a share that reaches
    one replica only waits for its peer, `--peer-timeout 1` here);
  - status_code_conformance: the status is one the contract documents for the operation;
  - content_type_conformance and response_schema_conformance: the body is what it documents.
`/v1/admin/reload` needs the deployment's HMAC, which the fuzzer does not have: 401.

schemathesis 4.x is a test-only dependency (`pip install 'schemathesis>=4,<5'`); without it
this module is skipped. Run: `python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", minversion="4")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.api.errors import ERRORS  # noqa: E402
from service.cluster import Cluster, free_ports  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

CONFIG = schemathesis.Config.from_str(
    """
seed = 20261125

[generation]
max-examples = 150
deterministic = true
database = "none"

[checks.not_a_server_error]
expected-statuses = ["2xx", "3xx", "4xx", "504"]
"""
)
schema = schemathesis.openapi.from_path(REPO / "openapi.yaml", config=CONFIG)


def error_code_matches_status(ctx, response, case):
    """An error body's code is one of the ERRORS table, sent with that code's status."""
    if response.status_code < 400:
        return None
    try:
        error = response.json()["error"]
        code = error["code"]
        assert isinstance(error["message"], str) and error["message"]
    except (ValueError, KeyError, TypeError):
        raise AssertionError(f"{response.status_code} without an error body") from None
    assert code in ERRORS, f"undocumented error code {code!r}"
    assert ERRORS[code][0] == response.status_code, (
        f"code {code!r} is documented as {ERRORS[code][0]}, answered {response.status_code}"
    )
    return None


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    error_code_matches_status,
]


@pytest.fixture(scope="module")
def replica(tmp_path_factory):
    c = Cluster(
        ports=free_ports(3),
        log_dir=tmp_path_factory.mktemp("fuzz-logs"),
        replica_args=("--peer-timeout", "1"),
    )
    with c:
        yield c.replica_urls[0]


SENT: dict[str, int] = {}


@schema.parametrize()
def test_replica_contract(case, replica):
    response = case.call_and_validate(base_url=replica, checks=CHECKS, timeout=30)
    if response.status_code == 504:  # the only 5xx allowed: a share without its partner
        assert response.json()["error"]["code"] == "peer_timeout", response.text
    key = f"{case.method} {case.path} {response.status_code}"
    SENT[key] = SENT.get(key, 0) + 1


def test_the_fuzzer_reached_the_replica_and_it_still_serves(replica):
    """Guards the fuzz against passing vacuously; the replica is still ready afterwards."""
    import httpx

    predicts = sum(n for k, n in SENT.items() if k.startswith("POST /v1/predict"))
    assert predicts >= 100, SENT
    assert {k.rsplit(" ", 1)[1] for k in SENT if "predict" in k} >= {"400", "422"}, SENT
    assert httpx.get(f"{replica}/v1/ready").status_code == 200
    print(SENT)


def _consistent(body):
    """The body with `input.data` sized to match `input.shape` when that is small (so the
    fuzzer's shapes reach the replica's shape checks and reshape, not only the base64 check)."""
    import base64
    import math

    tensor = body.get("input") if isinstance(body, dict) else None
    if not isinstance(tensor, dict) or not isinstance(tensor.get("shape"), list):
        return body
    shape = tensor["shape"]
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        return body
    n = math.prod(shape)
    if 0 <= n <= 4 * 784:
        tensor["data"] = base64.b64encode(bytes(8 * n)).decode()
    return body


@schema.include(path="/v1/predict").parametrize()
def test_predict_with_consistent_tensors(case, replica):
    case.body = _consistent(case.body)
    response = case.call_and_validate(base_url=replica, checks=CHECKS, timeout=30)
    if response.status_code == 504:
        assert response.json()["error"]["code"] == "peer_timeout", response.text
