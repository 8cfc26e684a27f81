"""Property-based requests generated from /openapi.json: whatever they send, never a 5xx.

Schemathesis' pytest plugin does not work with this pytest version (fixture-loaded schemas), so
each operation's hypothesis strategy is driven by hand: same generation, same checks. It runs
twice against a server with an API key: with the key (the requests reach the handlers) and
without it (every /v1 request must be a 401 problem+json, never a 5xx). Each run is bounded by
examples per operation (derandomized, so CI sees the same cases) and by a wall-clock budget.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator

import pytest
from svc_cases import Server

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("SVC_FUZZ_EXAMPLES", "25"))  # per operation; raise it to fuzz longer
BUDGET_S = float(os.environ.get("SVC_FUZZ_BUDGET_S", "120"))  # per run: CI stays fast
KEY = "fuzz-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(db=tmp_path_factory.mktemp("fuzz") / "jobs.db",
                 env={"GEOSHARE_API_KEY": KEY, "GEOSHARE_CONCURRENCY": "2", "GEOSHARE_MAX_LAYERS": "64",
                      "GEOSHARE_MAX_BODY_BYTES": "200000", "GEOSHARE_MAX_TIME_LIMIT_S": "5",
                      "GEOSHARE_MAX_WAIT_S": "5", "GEOSHARE_SOLVER_WORKERS": "1"})
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.slow
@pytest.mark.parametrize("with_key", [True, False], ids=["with-key", "without-key"])
def test_no_server_errors(keyed, with_key):
    schema = schemathesis.openapi.from_url(keyed.url + "/openapi.json")
    headers = {"Authorization": f"Bearer {KEY}"} if with_key else {}
    failures: list[str] = []
    ran = 0
    calls: list[tuple[str, int]] = []
    deadline = time.monotonic() + BUDGET_S
    for result in schema.get_all_operations():
        operation = result.ok()
        if time.monotonic() > deadline:
            break

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            # a case may carry its own Authorization (the security scheme): without-key drops it
            case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error], timeout=60)
            calls.append((case.path, response.status_code))

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {exc}")
        ran += 1
    statuses = Counter(status for _, status in calls)
    print(f"{len(calls)} requests over {ran} operations, statuses {sorted(statuses.items())}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 14 and len(calls) >= 5 * ran, (ran, len(calls))
    v1 = [status for path, status in calls if path.startswith("/v1/")]
    if with_key:
        assert any(200 <= s < 300 for s in v1) and statuses[401] == 0, statuses
    else:
        assert v1 and set(v1) == {401}, statuses
