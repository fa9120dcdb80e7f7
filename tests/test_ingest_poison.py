"""Poison records on the real broker: no record stops ingest, none is lost, none lands twice.

Accounting is by Kafka coordinates (topic, partition, offset) of every acknowledged record: each one
ends up either in the landing zone (the row carries its coordinates) or on the dead-letter topic (the
key is its coordinates), never both, never neither. Hostile records are named cases plus a seeded fuzz
loop of random byte mutations of valid records (whose outcome is whatever the contract says).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ingest import contract, landing, synthetic
from ingest.events import ResponseEvent
from tests.test_ingest_consume import _dead_letters

REPO = Path(__file__).resolve().parent.parent
KILLS = 3  # each restart waits out the killed member's 6 s session: ~10 s per kill
BIG = 1_200_000  # over kafka-python's default 1 MB max_request_size; tansu accepted 50 MB when measured

pytestmark = pytest.mark.stack


@pytest.fixture
def topics(stack, monkeypatch):
    from infra.stack import ensure_topics

    monkeypatch.setenv("FLYWHEEL_TOPIC_PREFIX", f"p{uuid.uuid4().hex[:8]}.")
    ensure_topics(stack.kafka)
    from ingest import endpoints

    return endpoints.topics()


def _valid(n: int, seed: int) -> list[tuple[str, bytes]]:
    """(event type, wire bytes) of n valid events with unique ids."""
    responses, feedback = synthetic.generate(n, seed=seed)
    return [("responses", synthetic.wire(r)) for r in responses] + [("feedback", synthetic.wire(f)) for f in feedback]


def _named_poison(template: bytes) -> list[tuple[str, bytes | None]]:
    """Every hostile case the issue names; ints and floats for every such field of the model."""
    good = json.loads(template)

    def with_(**over) -> bytes:  # noqa: ANN003
        return json.dumps(good | over).encode()

    def raw_field(field: str, literal: str) -> bytes:  # a JSON literal json.dumps cannot write
        return json.dumps(good | {field: 0}).replace(f'"{field}": 0', f'"{field}": {literal}').encode()

    cases: list[tuple[str, bytes | None]] = [
        ("over 1 MB", json.dumps(good | {"completion": "x" * BIG}).encode()),
        ("5000-digit number", raw_field("prompt_tokens", "9" * 5000)),
        ("30000-deep nesting", b"[" * 30_000 + b"]" * 30_000),
        ("30000-deep field", raw_field("completion", "[" * 30_000 + "]" * 30_000)),
        ("lone surrogate escape", raw_field("completion", '"\\ud800"')),
        ("surrogate bytes", with_(completion="X").replace(b'"X"', b'"\xed\xa0\x80"')),
        ("bad UTF-8", with_(completion="X").replace(b'"X"', b'"\xff\xfe"')),
        ("wrong type: completion", with_(completion=123)),
        ("wrong type: prompt", with_(prompt="hello")),
        ("wrong type: sampling", with_(sampling=[])),
        ("wrong type: created_at", with_(created_at=5)),
        ("schema_version 2", with_(schema_version=2)),
        ("schema_version '1'", with_(schema_version="1")),
        ("schema_version missing", json.dumps({k: v for k, v in good.items() if k != "schema_version"}).encode()),
        ("null value", None),
        ("empty value", b""),
        ("JSON null", b"null"),
        ("not an object", b"[1, 2]"),
    ]
    for col in contract.columns(ResponseEvent):
        *parents, leaf = col.path
        for value in {"int32": ("2147483648", "-2147483649", "18446744073709551616"),
                      "int64": ("9223372036854775808", "-9223372036854775809", "18446744073709551616"),
                      "float64": ("NaN", "Infinity", "-Infinity")}.get(col.type, ()):
            obj = json.loads(template)
            node = obj
            for p in parents:
                node = node[p]
            node[leaf] = "__HERE__"
            cases.append((f"{'.'.join(col.path)}={value}", json.dumps(obj).replace('"__HERE__"', value).encode()))
    return cases


def _mutations(valid: list[tuple[str, bytes]], rng: random.Random) -> list[bytes]:
    """Random byte edits (flip, insert, delete, duplicate a span) of valid records."""
    out = []
    for _, raw in valid:
        b = bytearray(raw)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b))
            op = rng.randrange(4)
            if op == 0:
                b[i] ^= 1 << rng.randrange(8)
            elif op == 1:
                b.insert(i, rng.choice(b'{}[]",:\\0123456789eE-+.\x00\xff\xc3 '))
            elif op == 2:
                del b[i]
            else:
                j = min(len(b), i + rng.randint(1, 16))
                b[i:i] = b[i:j]
        out.append(bytes(b))
    return out


def _produce(stack, topics, plan: list[tuple[str, str, bytes | None]]) -> list[tuple[str, str, tuple]]:
    """Send (label, topic key, value) in order; returns (label, value digest, coordinates) per ack."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=stack.kafka, acks="all", linger_ms=5,
                             max_request_size=4 * BIG)
    futures = [(label, value, producer.send(topics[key].name, key=b"k", value=value))
               for label, key, value in plan]
    producer.flush()
    acked = []
    for label, value, fut in futures:
        md = fut.get(timeout=30)
        acked.append((label, value, (md.topic, md.partition, md.offset)))
    producer.close()
    return acked


def _landed_coordinates(land: Path) -> tuple[dict[tuple, str], int]:
    """{coordinates: event_id} of every landed row (raw), and the raw row count."""
    coords, n = {}, 0
    for etype in landing.EVENT_TYPES:
        for r in landing.read_table(etype, land, dedupe=False).to_pylist():
            coords[(r["_topic"], r["_partition"], r["_offset"])] = r["event_id"]
            n += 1
    return coords, n


def _dead_letter_index(stack, topics) -> tuple[dict[tuple, dict], int]:
    out, n = {}, 0
    for m in _dead_letters(stack, topics):
        topic, part, off = m.key.decode().rsplit("/", 2)
        out[(topic, int(part), int(off))] = {"headers": dict(m.headers), "value": m.value}
        n += 1
    return out, n


def _commit_gaps(stack, acked) -> dict:
    """{partition: (committed, end)} where the group's committed offset is not the end of what we produced
    (the end is known exactly from the acks: no LATEST query, which tansu can answer stale)."""
    from kafka import KafkaConsumer, TopicPartition

    end: dict[tuple[str, int], int] = {}
    for *_, (topic, part, off) in acked:
        end[(topic, part)] = max(end.get((topic, part), 0), off + 1)
    consumer = KafkaConsumer(bootstrap_servers=stack.kafka, group_id="flywheel-landing", enable_auto_commit=False)
    try:
        got = {tp: consumer.committed(TopicPartition(*tp)) for tp in end}
    finally:
        consumer.close()
    return {f"{t}[{p}]": (got[(t, p)], e) for (t, p), e in sorted(end.items()) if got[(t, p)] != e}


def _plan(valid: list, poison: list, fuzz: list) -> list[tuple[str, str, bytes | None]]:
    """valid, bad, valid, bad, ...: every hostile record has valid records before and after it."""
    plan = []
    bad = [(f"poison:{n}", v) for n, v in poison] + [(f"fuzz:{i}", v) for i, v in enumerate(fuzz)]
    it = iter(valid)
    for label, value in bad:
        etype, raw = next(it)
        plan.append(("valid", etype, raw))
        plan.append((label, "responses", value))
    plan += [("valid", etype, raw) for etype, raw in it]
    dup_type, dup_raw = valid[len(valid) // 2]
    plan.insert(len(plan) // 2, ("valid duplicate", dup_type, dup_raw))  # same bytes, same event_id
    return plan


def _check(acked, land: Path, stack, topics) -> dict:
    """Every acknowledged record landed xor dead-lettered, as the contract says; returns the counts."""
    landed, raw_rows = _landed_coordinates(land)
    dead, dl_msgs = _dead_letter_index(stack, topics)
    both = set(landed) & set(dead)
    missing = [(label, c) for label, _, c in acked if c not in landed and c not in dead]
    assert not both and not missing, (sorted(both)[:5], missing[:5])
    assert len(landed) + len(dead) == len(acked) and set(landed) | set(dead) == {c for *_, c in acked}
    for label, value, c in acked:
        if label.startswith("valid"):
            assert c in landed, f"valid record {c} was dead-lettered: {dead.get(c, {}).get('headers')}"
        elif label.startswith("poison"):
            assert c in dead, f"{label} landed"
            h = dead[c]["headers"]
            assert h["error"] and h["source_topic"].decode() == c[0] and int(h["source_offset"]) == c[2]
            if value is not None and len(value) > 512 * 1024:  # kept in the landing zone, pointed at
                pointer = json.loads(dead[c]["value"])
                kept = land / pointer["payload_path"]
                assert kept.read_bytes() == value and pointer["sha256"] == hashlib.sha256(value).hexdigest()
                assert json.loads(kept.with_suffix(".json").read_text())["offset"] == c[2]
            elif value is not None:
                assert dead[c]["value"] == value  # the raw bytes, as received
    ids = [i for e in landing.EVENT_TYPES for i in landing.read_table(e, land).column("event_id").to_pylist()]
    assert len(ids) == len(set(ids)), "after readers' dedupe each event_id is there once"
    valid_ids = {landed[c] for label, _, c in acked if label.startswith("valid")}
    assert valid_ids <= set(ids)
    gaps = _commit_gaps(stack, acked)
    assert not gaps, f"committed offset != end of partition (committed, end): {gaps}"
    return {"records": len(acked), "landed": len(landed), "raw_rows": raw_rows, "dead_lettered": len(dead),
            "dead_letter_messages": dl_msgs, "valid": sum(lbl.startswith("valid") for lbl, *_ in acked),
            "fuzz_landed": sum(lbl.startswith("fuzz") and c in landed for lbl, _, c in acked)}


def test_poison_matrix_one_run(stack, topics, tmp_path):
    """Each hostile case between valid records, one consumer run: valid land once, bad are dead-lettered
    with a reason, the run never stops early, offsets are committed to the end, lag reported as 0."""
    from ingest.consume import Config, LandingConsumer

    valid = _valid(300, seed=7)
    poison = _named_poison(synthetic.wire(synthetic.generate(1, seed=8)[0][0]))
    fuzz = _mutations(_valid(120, seed=9)[:150], random.Random(13))
    acked = _produce(stack, topics, _plan(valid, poison, fuzz))
    land = tmp_path / "landing"
    cfg = Config(landing_dir=str(land), batch_max_records=64, batch_max_seconds=0.3, until_idle=True,
                 idle_seconds=2.0, metrics_every_s=1.0)
    summary = LandingConsumer(cfg).run()  # one run: it returns only when idle
    counts = _check(acked, land, stack, topics)
    assert summary["landed"] + summary["dead_lettered"] == len(acked)
    assert summary["dead_letters_in_files"] == 1 and summary["lag"] == 0
    print("\nPOISON", json.dumps(counts | {"named_cases": len(poison), "fuzz": len(fuzz), "runs": 1}))


def _files(land: Path) -> int:
    return sum(len(landing.landed_files(t, land)) for t in landing.EVENT_TYPES)


def _start(land: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ingest.consume", "--config", str(REPO / "ingest/configs/consume.yaml"),
           f"landing_dir={land}", "batch_max_records=80", "batch_max_seconds=0.3", "metrics_every_s=1",
           "until_idle=true", "idle_seconds=2"]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigkill_at_random_moments(stack, topics, tmp_path):
    """`python -m ingest.consume` killed with SIGKILL at random moments and restarted until a run ends
    by itself: no acknowledged record lost, no event twice after dedupe, each dead letter once by key."""
    rng = random.Random(int(os.environ.get("FLYWHEEL_KILL_SEED", "5")))
    valid = _valid(800, seed=11)
    poison = _named_poison(synthetic.wire(synthetic.generate(1, seed=12)[0][0]))
    fuzz = _mutations(_valid(40, seed=14)[:60], rng)
    acked = _produce(stack, topics, _plan(valid, poison, fuzz))
    land = tmp_path / "landing"
    kills, runs, deadline = 0, 0, time.time() + 100
    while True:
        proc = _start(land)
        runs += 1
        if kills < KILLS:
            # a random moment once this run is landing (a kill during start-up would test little)
            files = _files(land)
            while proc.poll() is None and _files(land) == files and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate()
                kills += 1
                continue
        try:
            proc.wait(timeout=max(5.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"the last run did not finish in time: {proc.communicate()[1][-3000:]}")
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]  # a run that ends by itself ends cleanly
        break
    summary = json.loads(out.strip().splitlines()[-1])
    try:
        counts = _check(acked, land, stack, topics)
    except AssertionError as e:
        log = "\n".join(line for line in err.splitlines() if "assigned" in line or "idle" in line or "WARN" in line)
        raise AssertionError(f"{e}\nlast run: {summary}\n{log[-3000:]}") from None
    assert summary["lag"] == 0
    print("\nSIGKILL", json.dumps(counts | {"kills": kills, "runs": runs,
                                            "duplicate_raw_rows": counts["raw_rows"] - counts["landed"]}))
