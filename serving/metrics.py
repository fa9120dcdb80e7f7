"""Prometheus metrics of one server (`GET /metrics`), in a registry of its own per app instance.

Request-path figures (latency per route, time to first token, tokens/s, feedback by kind and
adapter version, API errors by code) are recorded as they happen; engine and publisher figures
(queue depth, batch occupancy, spool size, replays) are read from their `state()` at scrape time,
so the hot paths of the engine and publisher carry no metrics code.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Feedback answers in ~1 ms and chat in seconds on CPU: buckets span both.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
LAG_PROBE_S = 0.1


class _StateCollector:
    """Gauges and counters read from the backend's and publisher's state() at each scrape."""

    def __init__(self, backend_state: Callable[[], dict], publisher_state: Callable[[], dict],
                 in_flight: Callable[[], int]):
        self.backend_state, self.publisher_state, self.in_flight = backend_state, publisher_state, in_flight

    def describe(self) -> list[Metric]:
        return []  # scraped lazily: the backend may not be up when the registry is built

    def collect(self) -> Iterator[Metric]:
        b = self.backend_state()
        queued = int(b.get("queue", 0))
        running = max(0, self.in_flight() - queued)
        max_batch = int(b.get("max_batch", 0)) or None
        yield GaugeMetricFamily("flywheel_engine_queue_depth", "generation requests waiting for a batch",
                                value=queued)
        yield GaugeMetricFamily("flywheel_batch_rows", "generation requests admitted and still decoding",
                                value=min(running, max_batch) if max_batch else running)
        if max_batch:
            yield GaugeMetricFamily("flywheel_batch_occupancy_ratio", "decoding requests / batching.max_batch",
                                    value=min(1.0, running / max_batch))
        for key, help_ in (("batches", "prefill passes started"), ("requests", "generation requests decoded"),
                           ("tokens", "decode row-steps (one row of a batch, one token)"),
                           ("joined", "requests that joined a running batch (continuous batching)")):
            if key in b:
                yield CounterMetricFamily(f"flywheel_engine_{key}", help_, value=b[key])
        p = self.publisher_state()
        yield GaugeMetricFamily("flywheel_publisher_queue_depth", "events queued in memory for Kafka",
                                value=p["queue"])
        yield GaugeMetricFamily("flywheel_publisher_spool_records", "events waiting in the disk spool",
                                value=p["spool_pending"])
        yield GaugeMetricFamily("flywheel_publisher_spooling", "1 while events go to the spool, not Kafka",
                                value=1 if p["mode"] == "spooling" else 0)
        records = CounterMetricFamily("flywheel_publisher_records", "event records by what happened to them",
                                      labels=["outcome"])
        for outcome in ("published", "sent", "spooled", "replayed", "overflow", "already_landed"):
            records.add_metric([outcome], p[outcome])
        yield records


class ServingMetrics:
    def __init__(self, backend_state: Callable[[], dict], publisher_state: Callable[[], dict]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "flywheel_http_request_duration_seconds", "time from request to the end of the response, per route",
            ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_token_seconds = Histogram(
            "flywheel_time_to_first_token_seconds", "streamed chat: request to the first generated text",
            buckets=LATENCY_BUCKETS, registry=r)
        self.tokens_per_second = Histogram(
            "flywheel_generation_tokens_per_second", "completion tokens / generation time, per answer",
            buckets=RATE_BUCKETS, registry=r)
        self.completion_tokens = Counter("flywheel_completion_tokens", "completion tokens generated",
                                         ["adapter_version"], registry=r)
        self.responses = Counter("flywheel_responses", "answers given (one response event each)",
                                 ["adapter_version", "ab_arm"], registry=r)
        self.feedback = Counter("flywheel_feedback_events", "feedback events accepted",
                                ["kind", "adapter_version"], registry=r)
        self.api_errors = Counter("flywheel_api_errors", "requests refused, by status and error code",
                                  ["status", "code"], registry=r)
        self.generations = Gauge("flywheel_generations_in_flight", "chat requests handed to the backend, "
                                 "not finished", registry=r)
        self.loop_lag_seconds = Histogram(
            "flywheel_event_loop_lag_seconds", f"how late the event loop woke from a {LAG_PROBE_S:g} s sleep: time "
            "it was busy with other work (or off the CPU) while requests waited", buckets=LAG_BUCKETS, registry=r)
        self._in_flight = 0
        self._lock = threading.Lock()
        self._probes: dict[int, asyncio.Task] = {}  # by id of the event loop it runs on (the loop holds tasks weakly)
        r.register(_StateCollector(backend_state, publisher_state, lambda: self._in_flight))

    def generation_started(self) -> None:
        with self._lock:  # started on the event loop, ended on the backend's worker thread
            self._in_flight += 1
        self.generations.inc()

    def generation_ended(self) -> None:
        with self._lock:
            self._in_flight -= 1
        self.generations.dec()

    def watch_event_loop(self) -> None:
        """Starts the lag probe on the running event loop, once per loop (the HTTP protocol calls this for
        each connection). A queue of requests behind a busy loop shows here before it shows in a route's
        latency."""
        loop = asyncio.get_running_loop()
        if id(loop) not in self._probes:
            self._probes[id(loop)] = loop.create_task(self._probe())

    async def _probe(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(LAG_PROBE_S)
            self.loop_lag_seconds.observe(max(0.0, time.perf_counter() - t0 - LAG_PROBE_S))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def version_label(adapter_version: str | None) -> str:
    return adapter_version or "base"
