"""Hand-written bad requests, as an attacker or a careless client sends them: each gets a 4xx
problem+json with the status that names its fault, never a 5xx.

Runs against the session server (caps: 64 layers, 200,000-byte bodies, 30 s time limit) and, for
the key cases, a server with an API key.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from svc_cases import Server, small_problem

PROBLEM_JSON = "application/problem+json"
JSON_HEADERS = {"Content-Type": "application/json"}
KEY = "fuzz-key"


def _good() -> dict[str, Any]:
    return json.loads(small_problem((4, 4), time_limit_s=2).model_dump_json())


def _edit(change: Callable[[dict[str, Any]], Any]) -> bytes:
    body = _good()
    change(body)
    return json.dumps(body).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Sets a dotted path (list indices as numbers) in the problem."""

    def change(body: dict[str, Any]) -> None:
        *head, last = path.split(".")
        node: Any = body
        for key in head:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[int(last) if isinstance(node, list) else last] = value

    return change


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda body: body.pop(key)


def _raw(body: dict[str, Any], old: str, new: str) -> bytes:
    text = json.dumps(body)
    assert old in text
    return text.replace(old, new, 1).encode()


GOOD = json.dumps(_good()).encode()

# (id, method, path, request kwargs, acceptable statuses)
CASES: list[tuple[str, str, str, dict[str, Any], set[int]]] = [
    # wrong methods
    ("put-plans", "PUT", "/v1/plans", {}, {405}),
    ("get-plans-collection", "GET", "/v1/plans", {}, {405}),
    ("patch-plan", "PATCH", "/v1/plans/abc", {}, {405}),
    ("delete-frontiers", "DELETE", "/v1/frontiers", {}, {405}),
    ("post-healthz", "POST", "/healthz", {"content": b"{}"}, {405}),
    ("put-readyz", "PUT", "/readyz", {}, {405}),
    ("options-plans", "OPTIONS", "/v1/plans", {}, {405}),
    ("head-plans", "HEAD", "/v1/plans", {}, {405}),
    ("put-claim", "PUT", "/v1/analyses/claim", {}, {405}),
    # wrong content types
    ("text-plain", "POST", "/v1/plans", {"content": GOOD, "headers": {"Content-Type": "text/plain"}}, {415}),
    ("form", "POST", "/v1/plans", {"data": {"layers": "x"}}, {415}),
    ("multipart", "POST", "/v1/plans", {"files": {"f": ("p.json", GOOD)}}, {415}),
    ("xml", "POST", "/v1/frontiers", {"content": b"<p/>", "headers": {"Content-Type": "application/xml"}}, {415}),
    ("octet-stream", "POST", "/v1/plans",
     {"content": GOOD, "headers": {"Content-Type": "application/octet-stream"}}, {415}),
    # bodies that are not JSON
    ("syntax-error", "POST", "/v1/plans", {"content": b"{not json"}, {400}),
    ("empty-body", "POST", "/v1/plans", {"content": b""}, {400}),
    ("truncated", "POST", "/v1/plans", {"content": GOOD[:-7]}, {400}),
    ("trailing-garbage", "POST", "/v1/plans", {"content": GOOD + b" x"}, {400}),
    ("bad-utf8", "POST", "/v1/plans", {"content": b'{"layers": "\xff\xfe"}'}, {400}),
    ("utf16-bom", "POST", "/v1/plans", {"content": "\ufeff{}".encode("utf-16")}, {400}),
    ("nan-literal", "POST", "/v1/plans", {"content": _raw(_good(), "0.0", "NaN")}, {400}),
    ("infinity-literal", "POST", "/v1/plans", {"content": _raw(_good(), '"time_limit_s": 2.0',
                                                                '"time_limit_s": Infinity')}, {400}),
    ("minus-infinity", "POST", "/v1/frontiers", {"content": _raw(_good(), "0.0", "-Infinity")}, {400}),
    ("5000-digit-int", "POST", "/v1/plans", {"content": _raw(_good(), '"seed": 0', '"seed": ' + "9" * 5000)}, {400}),
    ("deep-nesting", "POST", "/v1/plans", {"content": b"[" * 100_000 + b"]" * 100_000}, {400, 413}),
    ("single-quotes", "POST", "/v1/plans", {"content": b"{'layers': []}"}, {400}),
    ("analysis-not-json", "POST", "/v1/analyses", {"content": b"{oops"}, {400}),
    ("analysis-nan", "POST", "/v1/analyses", {"content": b'{"model": "minilm", "ratio": NaN}'}, {400}),
    ("claim-not-json", "POST", "/v1/analyses/claim", {"content": b"nul"}, {400}),
    ("analysis-text-plain", "POST", "/v1/analyses",
     {"content": b'{"model": "minilm"}', "headers": {"Content-Type": "text/plain"}}, {415}),
    ("claim-form", "POST", "/v1/analyses/claim",
     {"content": b"worker=w", "headers": {"Content-Type": "application/x-www-form-urlencoded"}}, {415}),
    # JSON of the wrong shape or types
    ("json-array", "POST", "/v1/plans", {"content": b"[]"}, {422}),
    ("json-string", "POST", "/v1/plans", {"content": b'"problem"'}, {422}),
    ("json-null", "POST", "/v1/plans", {"content": b"null"}, {422}),
    ("json-number", "POST", "/v1/frontiers", {"content": b"42"}, {422}),
    ("empty-object", "POST", "/v1/plans", {"content": b"{}"}, {422}),
    ("layers-string", "POST", "/v1/plans", {"content": _edit(_set("layers", "all"))}, {422}),
    ("layers-empty", "POST", "/v1/plans", {"content": _edit(_set("layers", []))}, {422}),
    ("params-string", "POST", "/v1/plans", {"content": _edit(_set("layers.0.params", "big"))}, {422}),
    ("params-fraction", "POST", "/v1/plans", {"content": _edit(_set("layers.0.params", 1.5))}, {422}),
    ("params-bool-list", "POST", "/v1/plans", {"content": _edit(_set("layers.0.params", [True]))}, {422}),
    ("matrix-strings", "POST", "/v1/plans", {"content": _edit(_set("costs.matrix", [["a"]]))}, {422}),
    ("matrix-not-square", "POST", "/v1/plans", {"content": _edit(_set("costs.matrix", [[0.0, 1.0]]))}, {422}),
    ("matrix-asymmetric", "POST", "/v1/plans", {"content": _edit(_set("costs.matrix.0.1", 9.0))}, {422}),
    ("cost-kind", "POST", "/v1/plans", {"content": _edit(_set("costs.kind", "quadratic"))}, {422}),
    ("time-limit-string", "POST", "/v1/plans", {"content": _edit(_set("options.time_limit_s", "fast"))}, {422}),
    ("duplicate-names", "POST", "/v1/plans", {"content": _edit(_set("layers.1.name", "block0.f0.weight"))}, {422}),
    ("pin-unknown", "POST", "/v1/plans", {"content": _edit(_set("constraints.pinned", ["ghost"]))}, {422}),
    ("forbid-self", "POST", "/v1/plans",
     {"content": _edit(_set("constraints.forbid", [["block0.f0.weight", "block0.f0.weight"]]))}, {422}),
    ("version-2", "POST", "/v1/plans", {"content": _edit(_set("version", "2"))}, {422}),
    # negative and huge numbers
    ("params-negative", "POST", "/v1/plans", {"content": _edit(_set("layers.0.params", -1))}, {422}),
    ("params-zero", "POST", "/v1/plans", {"content": _edit(_set("layers.0.params", 0))}, {422}),
    ("cost-negative", "POST", "/v1/plans",
     {"content": _edit(lambda b: (_set("costs.matrix.0.1", -1.0)(b), _set("costs.matrix.1.0", -1.0)(b)))}, {422}),
    ("cost-overflow", "POST", "/v1/plans", {"content": _edit(lambda b: (_set("costs.matrix.0.1", 123.25)(b), _set(
        "costs.matrix.1.0", 123.25)(b))).replace(b"123.25", b"1e400")}, {422}),
    ("cost-sum-overflow", "POST", "/v1/plans", {"content": _edit(lambda b: [_set(f"costs.matrix.{i}.{j}", 1.7e308)(b)
                                                                       for i in range(4) for j in range(4) if i != j])},
     {422}),
    ("time-limit-negative", "POST", "/v1/plans", {"content": _edit(_set("options.time_limit_s", -1))}, {422}),
    ("time-limit-zero", "POST", "/v1/plans", {"content": _edit(_set("options.time_limit_s", 0))}, {422}),
    ("time-limit-huge", "POST", "/v1/plans", {"content": _edit(_set("options.time_limit_s", 1e308))}, {422}),
    ("time-limit-over-cap", "POST", "/v1/frontiers", {"content": _edit(_set("options.time_limit_s", 600))}, {422}),
    ("ratio-negative", "POST", "/v1/plans", {"content": _edit(_set("constraints.max_params_ratio", -0.5))}, {422}),
    ("ratio-over-one", "POST", "/v1/plans", {"content": _edit(_set("constraints.max_params_ratio", 2))}, {422}),
    ("seed-negative", "POST", "/v1/plans", {"content": _edit(_set("options.seed", -1))}, {422}),
    ("workers-huge", "POST", "/v1/plans", {"content": _edit(_set("options.workers", 10**6))}, {422}),
    ("top-huge", "POST", "/v1/plans", {"content": _edit(_set("options.top", 10**9))}, {422}),
    ("gap-negative", "POST", "/v1/plans", {"content": _edit(_set("options.relative_gap", -0.1))}, {422}),
    ("group-size-zero", "POST", "/v1/plans", {"content": _edit(_set("constraints.max_group_size", 0))}, {422}),
    # unknown and missing fields
    ("unknown-top-level", "POST", "/v1/plans", {"content": _edit(_set("typo", 1))}, {422}),
    ("unknown-option", "POST", "/v1/plans", {"content": _edit(_set("options.time_limit", 5))}, {422}),
    ("unknown-layer-field", "POST", "/v1/plans", {"content": _edit(_set("layers.0.shape", [4, 4]))}, {422}),
    ("missing-costs", "POST", "/v1/plans", {"content": _edit(_drop("costs"))}, {422}),
    ("missing-layers", "POST", "/v1/frontiers", {"content": _edit(_drop("layers"))}, {422}),
    ("analysis-empty", "POST", "/v1/analyses", {"json": {}}, {422}),
    ("analysis-unknown-field", "POST", "/v1/analyses", {"json": {"model": "minilm", "bogus": 1}}, {422}),
    # too big
    ("body-over-cap", "POST", "/v1/plans", {"content": b" " * 300_000}, {413}),
    ("body-over-cap-chunked", "POST", "/v1/plans", {"content": iter([b" " * 100_000] * 3)}, {413}),
    ("layers-over-cap", "POST", "/v1/plans",
     {"content": small_problem((40, 30)).model_dump_json().encode()}, {413}),
    ("analysis-body-over-cap", "POST", "/v1/analyses", {"content": b"[" + b"1," * 120_000 + b"1]"}, {413}),
    # bad ids and query parameters
    ("unknown-plan", "GET", "/v1/plans/nope", {}, {404}),
    ("unknown-frontier", "DELETE", "/v1/frontiers/nope", {}, {404}),
    ("unknown-events", "GET", "/v1/plans/nope/events", {}, {404}),
    ("unknown-analysis", "GET", "/v1/analyses/nope", {}, {404}),
    ("id-too-long", "GET", "/v1/plans/" + "a" * 65, {}, {422}),
    ("id-odd-characters", "GET", "/v1/plans/%00%27%3B--", {}, {404}),
    ("id-dot-dot", "GET", "/v1/plans/..%2F..%2Fetc", {}, {404}),
    ("unknown-path", "GET", "/v1/nothing", {}, {404}),
    ("wait-negative", "GET", "/v1/plans/nope", {"params": {"wait": -1}}, {422}),
    ("wait-text", "POST", "/v1/plans", {"content": GOOD, "params": {"wait": "soon"}}, {422}),
    ("wait-huge", "POST", "/v1/plans", {"content": GOOD, "params": {"wait": 1e9}}, {422}),
    ("wait-nan", "GET", "/v1/plans/nope", {"params": {"wait": "nan"}}, {422}),
    ("wait-inf", "GET", "/v1/plans/nope", {"params": {"wait": "inf"}}, {422}),
    ("lease-missing", "POST", "/v1/analyses/nope/heartbeat", {}, {422}),
    ("lease-unknown", "POST", "/v1/analyses/nope/heartbeat", {"params": {"lease": "x"}}, {404, 409}),
    ("lease-seconds-negative", "POST", "/v1/analyses/nope/heartbeat",
     {"params": {"lease": "x", "lease_s": -5}}, {422}),
    ("idempotency-key-too-long", "POST", "/v1/plans",
     {"content": GOOD, "headers": {"Idempotency-Key": "k" * 256}}, {422}),
]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = Server(db=tmp_path_factory.mktemp("bad") / "jobs.db",
                 env={"GEOSHARE_API_KEY": KEY, "GEOSHARE_CONCURRENCY": "1", "GEOSHARE_MAX_BODY_BYTES": "200000"})
    srv.start()
    yield srv
    srv.stop()


def _assert_problem(r: httpx.Response, statuses: set[int]) -> dict[str, Any]:
    assert r.status_code < 500, r.text
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    if r.request.method == "HEAD":
        return {}
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers
    doc = r.json()
    assert doc["status"] == r.status_code and doc["title"] and doc["type"] and doc.get("detail"), doc
    return doc


@pytest.mark.parametrize(("method", "path", "kwargs", "statuses"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_is_4xx_problem_json(client, method, path, kwargs, statuses):
    kwargs = dict(kwargs)
    if "content" in kwargs:
        kwargs["headers"] = {**JSON_HEADERS, **kwargs.get("headers", {})}
    _assert_problem(client.request(method, path, **kwargs), statuses)


def test_405_names_the_allowed_methods(client):
    r = client.request("PATCH", "/v1/plans/abc")
    _assert_problem(r, {405})
    assert r.headers["allow"] == "DELETE, GET"


def test_idempotency_key_reused_for_another_body_is_422(client):
    first = client.post("/v1/plans", content=GOOD, headers={**JSON_HEADERS, "Idempotency-Key": "fuzz-reuse"})
    assert first.status_code in (200, 202)
    other = _edit(_set("options.seed", 7))
    doc = _assert_problem(client.post("/v1/plans", content=other,
                                      headers={**JSON_HEADERS, "Idempotency-Key": "fuzz-reuse"}), {422})
    assert doc["job"] == first.json()["id"]


def test_infeasible_budget_is_422_from_the_solve(client):
    body = _edit(_set("constraints.max_params_ratio", 0.01))
    doc = _assert_problem(client.post("/v1/plans", content=body, headers=JSON_HEADERS, params={"wait": 20}), {422})
    assert "least_ratio" in doc


KEY_CASES: list[tuple[str, str, str, dict[str, str], bytes | None]] = [
    ("post-no-key", "POST", "/v1/plans", {}, GOOD),
    ("post-wrong-key", "POST", "/v1/plans", {"Authorization": "Bearer nope"}, GOOD),
    ("post-basic-scheme", "POST", "/v1/frontiers", {"Authorization": f"Basic {KEY}"}, GOOD),
    ("post-bare-bearer", "POST", "/v1/plans", {"Authorization": "Bearer"}, GOOD),
    ("post-key-no-scheme", "POST", "/v1/plans", {"Authorization": KEY}, GOOD),
    ("post-key-prefix", "POST", "/v1/plans", {"Authorization": f"Bearer {KEY[:-1]}"}, GOOD),
    ("post-not-json-no-key", "POST", "/v1/plans", {}, b"{not json"),
    ("post-over-cap-no-key", "POST", "/v1/plans", {}, b" " * 300_000),
    ("get-no-key", "GET", "/v1/plans/abc", {}, None),
    ("delete-no-key", "DELETE", "/v1/frontiers/abc", {}, None),
    ("claim-no-key", "POST", "/v1/analyses/claim", {}, b"{}"),
    ("unknown-path-no-key", "GET", "/v1/nothing", {}, None),
]


@pytest.mark.parametrize(("method", "path", "headers", "body"), [c[1:] for c in KEY_CASES],
                         ids=[c[0] for c in KEY_CASES])
def test_missing_or_wrong_key_is_401_before_anything_else(keyed, method, path, headers, body):
    with httpx.Client(base_url=keyed.url, timeout=30) as c:
        r = c.request(method, path, content=body, headers={**JSON_HEADERS, **headers})
    doc = _assert_problem(r, {401})
    assert r.headers["www-authenticate"] == "Bearer" and "GEOSHARE_API_KEY" in doc["detail"]


def test_keyed_server_still_answers_bad_requests_with_the_key(keyed):
    with httpx.Client(base_url=keyed.url, timeout=30, headers={"Authorization": f"Bearer {KEY}"}) as c:
        _assert_problem(c.post("/v1/plans", content=b"{not json", headers=JSON_HEADERS), {400})
        _assert_problem(c.post("/v1/plans", content=b" " * 300_000, headers=JSON_HEADERS), {413})
        _assert_problem(c.get("/v1/plans/nope"), {404})


@pytest.mark.parametrize(("field", "value"), [("options.seed", 2**31), ("options.seed", 2**64),
                                              ("constraints.max_group_size", 2**63)])
def test_extreme_integers_never_5xx(client, field, value):
    """Issue 15: a seed of 2^31+ on a 17+ layer family, or max_group_size of 2^63+, crashed the solve."""
    body = json.loads(small_problem((18,), time_limit_s=2).model_dump_json())
    _set(field, value)(body)
    r = client.post("/v1/plans", json=body, params={"wait": 20})
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        _assert_problem(r, {422})
    else:
        assert r.json()["state"] == "succeeded", r.text
