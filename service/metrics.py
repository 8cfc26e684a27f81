"""Prometheus metrics on a registry of the app's own (several apps in one test process stay apart)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SOLVE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Request counts and latencies, solve times and outcomes, queue depth."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("geoshare_http_requests", "HTTP requests answered.",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("geoshare_http_request_seconds", "Time to answer a request (wait included).",
                                 ["method", "route"], registry=self.registry)
        self.solve_seconds = Histogram("geoshare_solve_seconds", "Wall time of a solve in its process.",
                                       ["kind", "outcome"], buckets=_SOLVE_BUCKETS, registry=self.registry)
        self.jobs = Counter("geoshare_jobs_finished", "Jobs finished, by outcome.", ["kind", "outcome"],
                            registry=self.registry)
        self.queue_depth = Gauge("geoshare_queue_depth", "Jobs waiting, by kind.", ["kind"], registry=self.registry)
        self.running = Gauge("geoshare_jobs_running", "Jobs running, by kind.", ["kind"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI (streaming responses such as SSE pass through untouched): counts and times requests."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)
