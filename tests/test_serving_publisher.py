"""The event publisher against a real tansu broker: direct sends, spooling while the broker is down,
ordered replay when it returns, each event id exactly once, and a spool left by a previous process."""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter

from serving.publisher import EventPublisher, Record, Spool, read_topic


def _ev(i: int) -> tuple[str, bytes]:
    eid = f"pub-{uuid.uuid4().hex[:12]}-{i}"
    return eid, json.dumps({"event_id": eid, "i": i}).encode()


def test_spool_roundtrip(tmp_path):
    spool = Spool(tmp_path)
    spool.append([Record("t", "k", b'{"a": "\xc3\xa9"}'), Record("t", "k2", b"{}")])
    (seg,) = spool.seal()
    spool.append([Record("t", "k3", b"{}")])
    assert len(spool.segments()) == 2 and spool.pending == 3
    recs = spool.read(seg)
    assert recs[0].value.decode() == '{"a": "é"}'
    spool.done(seg, 1, recs[1:])  # one acknowledged, one written back
    assert spool.pending == 2 and spool.read(seg) == recs[1:]
    assert Spool(tmp_path).pending == 2  # a new process finds what the old one left


def test_full_queue_spills_to_the_spool(tmp_path):
    """Past `queue_size` records waiting for the sender, publish() appends to the spool instead of
    queueing: it still returns at once and loses nothing. No broker needed: none is reachable here."""
    pub = EventPublisher("127.0.0.1:9", tmp_path / "spool", queue_size=0, retry_interval_s=60)
    try:
        t0 = time.monotonic()
        for i in range(5):
            pub.publish("t", f"k{i}", json.dumps({"event_id": f"e{i}"}).encode())
        assert time.monotonic() - t0 < 1.0
        assert pub.counts["overflow"] == 5 and pub.spool.pending == 5
        spooled = [r for seg in pub.spool.segments() for r in pub.spool.read(seg)]
        assert [r.event_id() for r in spooled] == [f"e{i}" for i in range(5)]
    finally:
        pub.close(timeout=1)


def test_broker_outage_spools_and_replays_exactly_once(stack, tmp_path):
    """Freeze the broker (SIGSTOP) while publishing: publish() never blocks, records spool, and after
    SIGCONT every event id is in the topic exactly once, including records that were in flight at
    the freeze (in doubt: the broker may have written them without the ack reaching us).

    A freeze rather than SIGTERM + restart keeps the session-wide broker's connections and groups
    intact for the other tests (restart durability itself is tested in tests/test_stack.py)."""
    import os
    import signal

    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from infra import stack as stack_mod

    topic = f"serving-test.publisher-{uuid.uuid4().hex[:8]}"  # private: other tests read the real topics
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka, request_timeout_ms=10_000)
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    admin.close()
    pub = EventPublisher(stack.kafka, tmp_path / "spool", delivery_timeout_ms=3000, retry_interval_s=0.5)
    ids = []
    pid = stack_mod._kafka().pid()
    try:
        assert pub.wait_idle(20), (pub.state(), pub.last_error)
        for i in range(20):
            eid, v = _ev(i)
            ids.append(eid)
            pub.publish(topic, eid, v)
        assert pub.wait_idle(20), (pub.state(), pub.last_error)
        os.killpg(pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            for i in range(20, 60):
                eid, v = _ev(i)
                ids.append(eid)
                pub.publish(topic, eid, v)
                time.sleep(0.1)
            assert time.perf_counter() - t0 < 8, "publish() must never block on a dead broker"
            deadline = time.monotonic() + 20
            while pub.state()["mode"] != "spooling" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert pub.state()["mode"] == "spooling" and pub.spool.pending > 0
        finally:
            os.killpg(pid, signal.SIGCONT)
        assert pub.wait_idle(60), (pub.state(), pub.last_error)
    finally:
        pub.close()
    got = Counter(ev["event_id"] for ev in read_topic(stack.kafka, topic, until=set(ids), timeout=30))
    mine = {i: got[i] for i in ids}
    assert all(n == 1 for n in mine.values()), {k: v for k, v in mine.items() if v != 1}
    assert pub.state()["spool_pending"] == 0 and not list((tmp_path / "spool").glob("seg-*"))


def test_spool_left_by_a_previous_process_is_replayed(stack, tmp_path):
    """A server that stopped while the broker was away left a spool; the next one sends it first."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = f"serving-test.respool-{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka, request_timeout_ms=10_000)
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    admin.close()
    left = [_ev(i) for i in range(5)]
    Spool(tmp_path / "spool").append([Record(topic, eid, v) for eid, v in left])
    pub = EventPublisher(stack.kafka, tmp_path / "spool", retry_interval_s=0.2)
    try:
        eid, v = _ev(99)
        pub.publish(topic, eid, v)
        assert pub.wait_idle(30), (pub.state(), pub.last_error)
    finally:
        pub.close()
    order = [e["i"] for e in read_topic(stack.kafka, topic, until={eid} | {e for e, _ in left}, timeout=30)]
    assert order == [0, 1, 2, 3, 4, 99]  # one partition: the spooled events first, in order
