"""The publisher in its own process (`events.process: sidecar`) against a real tansu broker: every
record lands once; a killed child is replaced and what was published while it was gone is spooled by
the serving side and sent by the next child; closing the pipe makes the child drain."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from serving.publisher import read_topic
from serving.sidecar import FROM_SERVER, SidecarPublisher, read_lines


def _topic(stack, partitions: int = 2) -> str:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    topic = f"serving-test.sidecar-{uuid.uuid4().hex[:8]}"  # private: other tests read the real topics
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka, request_timeout_ms=10_000)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    admin.close()
    return topic


def _publish(pub: SidecarPublisher, topic: str, n: int, tag: str) -> list[str]:
    ids = [f"side-{tag}-{uuid.uuid4().hex[:8]}-{i}" for i in range(n)]
    for eid in ids:
        pub.publish(topic, eid, json.dumps({"event_id": eid}).encode())
    return ids


def test_sidecar_lands_every_record_once_and_survives_its_child(stack, tmp_path):
    topic = _topic(stack)
    pub = SidecarPublisher(stack.kafka, tmp_path / "spool", delivery_timeout_ms=3000, retry_interval_s=0.5,
                           restart_interval_s=0.2)
    try:
        ids = _publish(pub, topic, 50, "a")
        assert pub.wait_idle(30), pub.state()
        assert pub.state()["process"] == "sidecar" and pub.counts["sent"] >= 50
        first = pub.state()["sidecar_pid"]
        os.kill(first, signal.SIGKILL)  # idle: it held nothing, so nothing may be missing
        time.sleep(0.3)
        t0 = time.perf_counter()
        ids += _publish(pub, topic, 30, "b")  # the first finds the child dead: spooled, and a new child started
        assert time.perf_counter() - t0 < 1.0, "publish() must not wait for the child"
        assert pub.wait_idle(30), pub.state()
        assert pub.state()["sidecar_restarts"] == 1 and pub.state()["sidecar_pid"] not in (first, None)
        # those that found the child gone (the first, and any published before the writer had put them on
        # disk) went through <spool_dir>/from-server/ to the next child
        assert 1 <= pub.local["spooled_here"] <= 30
    finally:
        pub.close()
    got = Counter(ev["event_id"] for ev in read_topic(stack.kafka, topic, until=set(ids), timeout=30))
    assert {i: got[i] for i in ids} == dict.fromkeys(ids, 1)
    assert not list((tmp_path / "spool" / FROM_SERVER).glob("seg-*")), "the next child adopted the spool"


def test_closing_the_pipe_makes_the_child_drain(stack, tmp_path):
    """What the child still holds when the serving side goes away is sent before it exits."""
    topic = _topic(stack, partitions=1)
    pub = SidecarPublisher(stack.kafka, tmp_path / "spool")
    assert pub.wait_idle(30), pub.state()  # connected
    ids = _publish(pub, topic, 200, "d")
    pub.close(timeout=20)  # no wait_idle first: the child gets EOF with records still queued
    assert pub._child.returncode == 0
    got = [ev["event_id"] for ev in read_topic(stack.kafka, topic, until=set(ids), timeout=30)]
    assert got == ids  # one partition: in order, each once


def test_a_full_pipe_hands_over_to_the_writer_in_order(stack, tmp_path):
    """While the child reads nothing (stopped), publish() keeps returning at once: the pipe fills and
    the writer thread holds the rest; records published while it drains wait behind it, and every
    record lands once, in order."""
    topic = _topic(stack, partitions=1)
    pub = SidecarPublisher(stack.kafka, tmp_path / "spool")
    assert pub.wait_idle(30), pub.state()
    pad = "x" * 2000  # 1,500 records of ~2 KB: three times the pipe's 1 MiB
    ids = [f"side-f-{uuid.uuid4().hex[:8]}-{i}" for i in range(1500)]
    os.kill(pub.state()["sidecar_pid"], signal.SIGSTOP)
    try:
        t0 = time.perf_counter()
        for eid in ids:
            pub.publish(topic, eid, json.dumps({"event_id": eid, "pad": pad}).encode())
        assert time.perf_counter() - t0 < 5.0, "publish() must not wait for the child"
        assert pub.state()["queue"] > 0, "the pipe should have filled"
    finally:
        os.kill(pub.state()["sidecar_pid"], signal.SIGCONT)
    ids += _publish(pub, topic, 300, "g")  # while the backlog drains: behind it, not into the pipe first
    assert pub.wait_idle(60), pub.state()
    assert pub.local["spooled_here"] == 0 and pub.restarts == 0
    pub.close()
    got = [ev["event_id"] for ev in read_topic(stack.kafka, topic, until=set(ids), timeout=60)]
    assert got == ids  # one partition: in order, each once


def test_a_server_with_the_sidecar_emits_its_events(stack, tiny_model, tmp_path):
    """The whole server with `events.process=sidecar`: a chat and its feedback land in Kafka, and
    /healthz says who publishes."""
    import httpx

    from ingest.config import load_config
    from serving.serve import BackgroundServer, Config
    from tests.test_serving import REPO, private_topics

    cfg = load_config(Config, REPO / "serving/configs/serve.tiny.yaml", [
        "http.port=0", "http.token_secret=sidecar", "registry.enabled=false", "events.process=sidecar",
        f"events.spool_dir={tmp_path / 'spool'}", "generation.max_tokens=4"])
    with private_topics(stack.kafka) as topics, BackgroundServer(cfg) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "user": "sid"}).json()
        fb = httpx.post(srv.url + "/v1/feedback", timeout=30, json={
            "response_id": r["response_id"], "feedback_token": r["feedback_token"], "user": "sid",
            "kind": "thumbs_up"}).json()
        assert srv.service.publisher.wait_idle(30), srv.service.publisher.state()
        events = httpx.get(srv.url + "/healthz").json()["events"]
        assert events["process"] == "sidecar" and events["sent"] >= 2
    assert [e["event_id"] for e in read_topic(stack.kafka, topics["responses"].name, until={r["response_id"]})
            if e["event_id"] == r["response_id"]] == [r["response_id"]]
    assert [e["event_id"] for e in read_topic(stack.kafka, topics["feedback"].name, until={fb["event_id"]})
            if e["event_id"] == fb["event_id"]] == [fb["event_id"]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=300).map(lambda b: b.replace(b"\n", b"")), max_size=40),
       st.booleans(), st.lists(st.integers(1, 700), min_size=1, max_size=8))
def test_read_lines_gives_back_every_line_whatever_the_chunks(lines, unfinished, sizes):
    """The child's batched pipe reader: written in chunks of any size, every line comes back once, in
    order, without its newline; an unfinished last line comes back at end of file as it was."""
    data = b"".join(line + b"\n" for line in lines) + (b"tail-without-newline" if unfinished else b"")
    r, w = os.pipe()

    def write() -> None:
        i = k = 0
        while i < len(data):
            n = sizes[k % len(sizes)]
            os.write(w, data[i:i + n])
            i, k = i + n, k + 1
        os.close(w)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        got = [line for batch in read_lines(r, 0.0) for line in batch]
    finally:
        writer.join()
        os.close(r)
    assert got == lines + ([b"tail-without-newline"] if unfinished else [])


def test_read_lines_takes_what_waited_in_one_batch_and_naps_between_reads():
    """Records that arrived while the reader napped come back as one batch (one wake-up for all of
    them), and reads are at least the interval apart."""
    r, w = os.pipe()
    try:
        os.write(w, b"".join(b"record-%d\n" % i for i in range(50)))
        batches = read_lines(r, 0.05)
        t0 = time.monotonic()
        assert next(batches) == [b"record-%d" % i for i in range(50)]
        os.write(w, b"later\n")
        assert next(batches) == [b"later"]
        assert time.monotonic() - t0 >= 0.05
    finally:
        os.close(w)
        os.close(r)
