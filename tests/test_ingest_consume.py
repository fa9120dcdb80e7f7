"""Landing consumer against the real tansu broker: conservation through crashes, dead letters, SIGTERM,
a consumer group scaling out through a SIGKILL. Every test uses its own topic prefix and landing folder."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ingest import landing, synthetic
from ingest.events import MAX_EVENT_BYTES

REPO = Path(__file__).resolve().parent.parent


def _malformed(n: int) -> list[bytes]:
    """Every kind of bad record the contract names: bad JSON, wrong schema, oversized, unknown version."""
    r, _ = synthetic.generate(1, seed=99)
    good = json.loads(synthetic.wire(r[0]))
    kinds = [
        b"{not json",
        b"\xff\xfe not utf8",
        json.dumps(good | {"schema_version": 2}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "completion"}).encode(),
        json.dumps(good | {"completion": "x" * (MAX_EVENT_BYTES + 10)}).encode(),
        b"[1, 2, 3]",
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


@pytest.fixture
def topics(stack, monkeypatch):
    """Fresh topics (own prefix) for one test; the consumer subprocesses inherit the prefix."""
    from infra.stack import ensure_topics

    monkeypatch.setenv("FLYWHEEL_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:8]}.")
    ensure_topics(stack.kafka)
    from ingest import endpoints

    return endpoints.topics()


def _produce(stack, topics, n_conv: int, n_bad: int, seed: int = 0) -> tuple[set[str], list[bytes]]:
    from kafka import KafkaProducer

    responses, feedback = synthetic.generate(n_conv, seed=seed)
    bad = _malformed(n_bad)
    producer = KafkaProducer(bootstrap_servers=stack.kafka, acks="all", linger_ms=5)
    good = [(topics["responses"].name, r) for r in responses] + [(topics["feedback"].name, f) for f in feedback]
    step = max(1, len(good) // max(1, n_bad))
    for i, (topic, row) in enumerate(good):
        producer.send(topic, key=row["conversation_id"].encode(), value=synthetic.wire(row))
        if i % step == 0 and bad:
            producer.send(topics["feedback"].name, key=b"bad", value=bad.pop())
    for b in bad:
        producer.send(topics["responses"].name, key=b"bad", value=b)
    producer.flush()
    producer.close()
    return {r["event_id"] for _, r in good}, _malformed(n_bad)


def _start(land: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ingest.consume", "--config", str(REPO / "ingest/configs/consume.yaml"),
           f"landing_dir={land}", "batch_max_records=150", "batch_max_seconds=0.5", "metrics_every_s=1",
           *overrides]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _files(land: Path) -> int:
    return sum(len(landing.landed_files(t, land)) for t in landing.EVENT_TYPES)


def _dead_letters(stack, topics) -> list:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, enable_auto_commit=False, consumer_timeout_ms=3000)
    tp = TopicPartition(topics["dead_letter"].name, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out = list(consumer)
    consumer.close()
    return out


def _committed_equals_highwater(stack, topics, group: str) -> bool:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, group_id=group, enable_auto_commit=False)
    ok = True
    for key in ("responses", "feedback"):
        t = topics[key]
        tps = [TopicPartition(t.name, p) for p in range(t.partitions)]
        consumer.assign(tps)
        for tp in tps:
            consumer.seek_to_beginning(tp)
            consumer.poll(timeout_ms=200)
        # count records by reading to the end: high-watermarks from fetches, not a LATEST query
        n = {tp: 0 for tp in tps}
        last = {tp: -1 for tp in tps}
        for _ in range(50):
            got = consumer.poll(timeout_ms=300)
            if not got:
                break
            for tp, recs in got.items():
                n[tp] += len(recs)
                last[tp] = recs[-1].offset
        for tp in tps:
            committed = consumer.committed(tp)
            if last[tp] >= 0 and committed != last[tp] + 1:
                ok = False
    consumer.close()
    return ok


def test_conservation_through_sigkill_restarts(stack, topics, tmp_path):
    """N produced (valid + malformed) = landed + dead-lettered, each event_id exactly once on read,
    after three SIGKILLs mid-stream and a final clean run; committed offsets = end of each partition."""
    valid_ids, bad = _produce(stack, topics, n_conv=1200, n_bad=30)
    land = tmp_path / "landing"
    kills = 0
    for target in (2, 6, 12):
        proc = _start(land)
        deadline = time.time() + 60
        while _files(land) < target and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # mid-stream: a batch is in hand, its offsets uncommitted
        proc.wait()
        kills += 1
    proc = _start(land, "until_idle=true", "idle_seconds=2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert kills == 3 and summary["lag"] == 0  # measured before the consumer closes

    seen = {}
    for etype in landing.EVENT_TYPES:
        table = landing.read_table(etype, land)
        ids = table.column("event_id").to_pylist()
        assert len(ids) == len(set(ids)), "dedupe on read must leave each event_id once"
        for i in ids:
            seen[i] = seen.get(i, 0) + 1
    assert set(seen) == valid_ids  # nothing lost, nothing invented
    assert all(c == 1 for c in seen.values())

    dl = _dead_letters(stack, topics)
    keys = {m.key for m in dl}
    assert len(keys) == len(bad)  # each malformed record dead-lettered (replays re-send the same key)
    headers = dict(dl[0].headers)
    assert headers["error"] and headers["source_topic"] and "source_offset" in headers
    assert sorted({m.value for m in dl}) == sorted(set(bad))  # the raw bytes, as received
    assert _committed_equals_highwater(stack, topics, "flywheel-landing")


def test_sigterm_finishes_batch_and_commits(stack, topics, tmp_path):
    """SIGTERM: exit 0 with a summary; a restart then lands the rest without one duplicate row."""
    valid_ids, _ = _produce(stack, topics, n_conv=400, n_bad=5, seed=1)
    land = tmp_path / "landing"
    proc = _start(land)
    deadline = time.time() + 60
    while _files(land) < 3 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    first = json.loads(out.strip().splitlines()[-1])
    assert first["landed"] > 0
    proc = _start(land, "until_idle=true", "idle_seconds=2")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    raw = sum(landing.read_table(t, land, dedupe=False).num_rows for t in landing.EVENT_TYPES)
    assert raw == len(valid_ids)  # a clean stop commits exactly what it landed: zero duplicates


@pytest.fixture
def six_partitions(stack, monkeypatch):
    """Fresh topics (own prefix) whose responses / feedback have six partitions: room for four members."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from infra.stack import ensure_topics
    from ingest import endpoints

    monkeypatch.setenv("FLYWHEEL_TOPIC_PREFIX", f"t{uuid.uuid4().hex[:8]}.")
    topics = {k: endpoints.Topic(t.name, 6 if k != "dead_letter" else t.partitions)
              for k, t in endpoints.topics().items()}
    admin = KafkaAdminClient(bootstrap_servers=stack.kafka, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(t.name, num_partitions=t.partitions, replication_factor=1)
                             for t in topics.values()])
    finally:
        admin.close()
    ensure_topics(stack.kafka)  # nothing left to create: ours are there with six partitions
    return topics


def _start_logged(land: Path, log: Path, *overrides: str) -> subprocess.Popen:
    """A consumer writing its log to `log` (and the summary to log.out): pipes nobody reads can fill."""
    cmd = [sys.executable, "-m", "ingest.consume", "--config", str(REPO / "ingest/configs/consume.yaml"),
           f"landing_dir={land}", "batch_max_records=150", "batch_max_seconds=0.5", "metrics_every_s=1",
           *overrides]
    with open(log.with_suffix(".out"), "w") as out, open(log, "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=out, stderr=err, text=True)


def _landed(log: Path) -> int:
    """Rows the consumer has landed and committed, from its last metrics line."""
    counts = re.findall(r"landed=(\d+)", log.read_text())
    return int(counts[-1]) if counts else 0


def _commit_gaps(stack, topics, group: str, records: int) -> dict:
    """{partition: (committed, end)} where the group's committed offset is not the end of the partition.
    The end is read, not asked for (tansu's LATEST offset can be stale): all `records` produced."""
    from kafka import KafkaConsumer, TopicPartition

    tps = [TopicPartition(topics[k].name, p)
           for k in ("responses", "feedback") for p in range(topics[k].partitions)]
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, group_id=group, enable_auto_commit=False)
    try:
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end, read, deadline = dict.fromkeys(tps, 0), 0, time.monotonic() + 30
        while read < records and time.monotonic() < deadline:
            for tp, recs in consumer.poll(timeout_ms=300).items():
                end[tp] = recs[-1].offset + 1
                read += len(recs)
        assert read == records, f"read {read} of the {records} records produced"
        return {f"{tp.topic}[{tp.partition}]": (consumer.committed(tp), end[tp]) for tp in tps
                if (consumer.committed(tp) or 0) != end[tp]}
    finally:
        consumer.close()


@pytest.mark.slow
def test_consumer_group_scales_out_and_survives_a_kill(stack, six_partitions, tmp_path):
    """Three landing consumers on six partitions; one is SIGKILLed once it has landed, a fourth joins.
    Every event lands (once on read), the raw duplicates are only replayed batches, and the group ends
    committed to the end of every partition.

    Regression: a member stopping as the group's leader while the group re-formed (after another member
    joined or left) used to send LeaveGroup, and tansu then answered every SyncGroup of the group -- now
    and in every later run -- with REBALANCE_IN_PROGRESS; hence the last step, the next run."""
    topics = six_partitions
    valid_ids, _ = _produce(stack, topics, n_conv=1500, n_bad=0, seed=2)
    land = tmp_path / "landing"
    group = f"scale-{uuid.uuid4().hex[:6]}"  # its own group: no members left over from other tests
    args = ("until_idle=true", "idle_seconds=4", f"group_id={group}")
    logs = [tmp_path / f"consumer{i}.log" for i in range(4)]
    t0 = time.monotonic()
    procs = [_start_logged(land, logs[i], *args) for i in range(3)]
    victim = procs[1]
    try:
        deadline = time.monotonic() + 60
        while _landed(logs[1]) == 0 and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.05)
        assert victim.poll() is None and _landed(logs[1]) > 0, logs[1].read_text()[-3000:]
        os.kill(victim.pid, signal.SIGKILL)  # mid-run: whatever it landed since its last commit is replayed
        victim.wait()
        procs.append(_start_logged(land, logs[3], *args))
        survivors = [0, 2, 3]
        deadline = time.monotonic() + 120
        while any(procs[i].poll() is None for i in survivors) and time.monotonic() < deadline:
            time.sleep(0.2)
        tails = "\n".join(f"--- consumer{i}\n{logs[i].read_text()[-2500:]}" for i in survivors)
        assert all(procs[i].poll() == 0 for i in survivors), tails
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - t0
    summaries = [json.loads(logs[i].with_suffix(".out").read_text().strip().splitlines()[-1])
                 for i in survivors]
    assert all(s["lag"] in (0, None) for s in summaries), summaries
    assert "assigned ['" in logs[3].read_text(), "the member added mid-run got partitions"

    ids = [i for t in landing.EVENT_TYPES for i in landing.read_table(t, land).column("event_id").to_pylist()]
    assert len(ids) == len(set(ids)) and set(ids) == valid_ids  # every event once, after readers' dedupe
    raw = sum(landing.read_table(t, land, dedupe=False).num_rows for t in landing.EVENT_TYPES)
    # Replays land a batch again: the victim's landed-but-uncommitted one, and any batch whose commit the
    # group refused because it had moved on (each at most batch_max_records rows).
    replayed_batches = 1 + sum(s["commit_failures"] for s in summaries)
    assert len(valid_ids) <= raw <= len(valid_ids) + 150 * replayed_batches, (raw, summaries)
    assert _commit_gaps(stack, topics, group, len(valid_ids)) == {}  # lag 0: committed = end, every partition

    # The group is still usable: the next batch run (its predecessors may still be members until their
    # sessions time out) ends up holding all twelve partitions, finds nothing new and stops.
    nxt = _start_logged(land, tmp_path / "next.log", "until_idle=true", "idle_seconds=2", f"group_id={group}")
    try:
        nxt.wait(timeout=60)
    except subprocess.TimeoutExpired:
        nxt.kill()
        nxt.wait()
    log = (tmp_path / "next.log").read_text()
    assert nxt.returncode == 0, f"the next run did not finish in 60 s (exit {nxt.returncode}):\n{log[-3000:]}"
    last = json.loads((tmp_path / "next.out").read_text().strip().splitlines()[-1])
    assert last["landed"] == 0 and last["lag"] == 0, last
    assert re.findall(r"assigned \[(.*)\]", log)[-1].count("[") == 12, log[-3000:]
    print(f"\nSCALE-OUT {elapsed:.1f}s (+{time.monotonic() - t0 - elapsed:.1f}s next run) "
          f"events={len(valid_ids)} duplicate_raw_rows={raw - len(valid_ids)} "
          f"commit_failures={replayed_batches - 1}")
