"""Property-based requests generated from /openapi.json: whatever they send, never a 5xx.

Schemathesis' pytest plugin does not work with this pytest version (fixture-loaded schemas), so
each operation's hypothesis strategy is driven by hand: same generation, same checks.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

MAX_EXAMPLES = int(os.environ.get("SVC_FUZZ_EXAMPLES", "25"))  # per operation; raise it to fuzz longer


@pytest.mark.slow
def test_no_server_errors(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    failures: list[str] = []
    ran = 0
    calls: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:
            calls.append(case.call_and_validate(checks=[not_a_server_error], timeout=60).status_code)

        try:
            check()
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.label}: {exc}")
        ran += 1
    assert ran >= 14 and len(calls) >= 5 * ran
    print(f"{len(calls)} requests, statuses {sorted(Counter(calls).items())}")
    assert not failures, "\n\n".join(failures)
