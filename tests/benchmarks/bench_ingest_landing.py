"""Benchmark: landing consumer throughput vs a bare kafka-python consume loop on the same topics.

Both read the same N records (valid events of the contract) from the real tansu broker, each with its
own consumer group; time runs from the first record received to the last one handled (the group join
is excluded: tansu delays it by half the session timeout, docs/performance.md). Two rounds, bare and landing alternating so that both
see the same machine; the best round of each is compared. Target: landing >= 0.7x the bare loop.
Writes var/bench/ingest_landing.json.   Run: make bench (or pytest -s tests/benchmarks/bench_ingest_landing.py)
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from ingest import synthetic
from tests.benchmarks._machine import Target, save

N_CONV = int(os.environ.get("BENCH_LANDING_CONVERSATIONS", "40000"))  # ~100k events


def _produce(stack, topics) -> int:
    from kafka import KafkaProducer

    responses, feedback = synthetic.generate(N_CONV, seed=11)
    producer = KafkaProducer(bootstrap_servers=stack.kafka, acks=1, linger_ms=20, batch_size=256 * 1024)
    for name, rows in (("responses", responses), ("feedback", feedback)):
        for row in rows:
            producer.send(topics[name].name, key=row["conversation_id"].encode(), value=synthetic.wire(row))
    producer.flush()
    producer.close()
    return len(responses) + len(feedback)


def _bare(stack, topics, n: int) -> float:
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, group_id=f"bare-{uuid.uuid4().hex[:6]}",
                             enable_auto_commit=False, auto_offset_reset="earliest", session_timeout_ms=6000,
                             heartbeat_interval_ms=2000, max_poll_records=5000)
    consumer.subscribe([topics["responses"].name, topics["feedback"].name])
    got, first = 0, None
    deadline = time.time() + 300
    while got < n and time.time() < deadline:
        for recs in consumer.poll(timeout_ms=500, max_records=5000).values():
            if first is None and recs:
                first = time.perf_counter()
            got += len(recs)
    elapsed = time.perf_counter() - first
    consumer.commit()
    consumer.close()
    assert got == n
    return n / elapsed


def _landing(stack, topics, n: int, land: Path) -> float:
    from ingest.consume import Config, LandingConsumer

    lc = LandingConsumer(Config(group_id=f"land-{uuid.uuid4().hex[:6]}", landing_dir=str(land), until_idle=True,
                                idle_seconds=2.0, metrics_every_s=60))
    marks: dict[str, float] = {}
    poll, flush = lc.consumer.poll, lc.flush

    def timed_poll(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = poll(*a, **kw)
        if out and "first" not in marks:
            marks["first"] = time.perf_counter()
        return out

    def timed_flush():  # noqa: ANN202
        flush()
        if lc.landed + lc.dead_lettered >= n and "last" not in marks:
            marks["last"] = time.perf_counter()

    lc.consumer.poll, lc.flush = timed_poll, timed_flush
    summary = lc.run()
    assert summary["landed"] == n, summary
    return n / (marks["last"] - marks["first"])


@pytest.mark.bench
def test_bench_landing_vs_bare_loop(stack, monkeypatch, tmp_path):
    from infra.stack import ensure_topics

    monkeypatch.setenv("FLYWHEEL_TOPIC_PREFIX", f"b{uuid.uuid4().hex[:6]}.")
    ensure_topics(stack.kafka)
    from ingest import endpoints

    topics = endpoints.topics()
    n = _produce(stack, topics)
    bares, lands = [], []
    for i in range(2):
        bares.append(_bare(stack, topics, n))
        lands.append(_landing(stack, topics, n, tmp_path / f"landing-{i}"))
    bare, land = max(bares), max(lands)
    result = {"events": n, "bare_events_per_s": round(bare), "landing_events_per_s": round(land),
              "ratio": round(land / bare, 3),
              "rounds": {"bare": [round(x) for x in bares], "landing": [round(x) for x in lands]}}
    print("\nBENCH ingest_landing", json.dumps(result))
    save("ingest_landing.json", result, dtype=None,  # no tensors; the record says which CPU and cores
         targets=[Target("landing_vs_bare", round(land / bare, 3), ">=", 0.7)])
