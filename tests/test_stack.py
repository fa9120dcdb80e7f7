"""The embedded stack with real processes: up, durability across a broker restart and across a full
stack restart (clean `down` and SIGKILL of every process), port clash, down.

These start their own stack on fresh ports and a fresh var/ (not the shared `stack` fixture),
because they restart and stop it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra import stack
from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.stack


@pytest.fixture
def own_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLYWHEEL_VAR", str(tmp_path / "var"))
    ports = {n: free_port() for n in ("s3", "kafka", "mlflow", "airflow")}
    for n, p in ports.items():
        monkeypatch.setenv(f"FLYWHEEL_{n.upper()}_PORT", str(p))
    monkeypatch.delenv("FLYWHEEL_KAFKA_BOOTSTRAP", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{ports['mlflow']}")
    yield ports
    stack.down()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infra.stack", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=os.environ.copy())


def test_up_restart_keeps_acknowledged_events_and_down_stops_everything(own_stack):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    assert _cli("up").returncode == 0
    st = json.loads(_cli("status", "--json").stdout)
    assert st["healthy"] is True
    assert st["kafka"] == f"127.0.0.1:{own_stack['kafka']}"
    assert st["mlflow"] == f"http://127.0.0.1:{own_stack['mlflow']}"
    assert {"s3", "kafka", "mlflow"} <= set(st["components"])
    assert {t["name"] for t in st["topics"].values()} == {"flywheel.responses", "flywheel.feedback",
                                                         "flywheel.dead-letter"}
    pids = [c["pid"] for c in st["components"].values()]

    producer = KafkaProducer(bootstrap_servers=st["kafka"], acks="all", linger_ms=5)
    futures = [producer.send("flywheel.feedback", key=f"k{i % 17}".encode(), value=f"event-{i}".encode())
               for i in range(1000)]
    producer.flush()
    assert all(f.get(timeout=30) for f in futures)  # every record acknowledged by the broker
    producer.close()

    old_kafka_pid = st["components"]["kafka"]["pid"]
    assert _cli("restart", "kafka").returncode == 0
    st2 = json.loads(_cli("status", "--json").stdout)
    assert st2["healthy"] and st2["components"]["kafka"]["pid"] != old_kafka_pid

    # Records written after the restart must append, not overwrite (the failure of an S3 emulator that
    # ignores conditional writes: the broker restarts its offsets at 0).
    producer = KafkaProducer(bootstrap_servers=st["kafka"], acks="all")
    after = [producer.send("flywheel.feedback", key=b"k0", value=f"late-{i}".encode()).get(timeout=30)
             for i in range(10)]
    producer.close()
    assert min(md.offset for md in after) > 0

    consumer = KafkaConsumer(bootstrap_servers=st["kafka"], enable_auto_commit=False,
                             consumer_timeout_ms=5000)
    parts = [TopicPartition("flywheel.feedback", p) for p in range(3)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen = [m.value.decode() for m in consumer]
    consumer.close()
    assert len(seen) == 1010
    assert set(seen) == {f"event-{i}" for i in range(1000)} | {f"late-{i}" for i in range(10)}

    assert _cli("down").returncode == 0
    pids.append(st2["components"]["kafka"]["pid"])
    time.sleep(0.5)
    assert not [p for p in pids if stack.pid_alive(p)], "down left processes running"
    assert not list((Path(os.environ["FLYWHEEL_VAR"]) / "run").glob("*.pid"))


FEEDBACK_PARTS = 3


def _produce(bootstrap: str, values: list[str]) -> list:
    """Send with acks=all and return every record's metadata: each one acknowledged, or this raises."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    futures = [producer.send("flywheel.feedback", key=f"k{i % 17}".encode(), value=v.encode())
               for i, v in enumerate(values)]
    producer.flush()
    acked = [f.get(timeout=30) for f in futures]
    producer.close()
    return acked


def _read_topic(bootstrap: str) -> list[str]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=5000)
    parts = [TopicPartition("flywheel.feedback", p) for p in range(FEEDBACK_PARTS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    seen = [m.value.decode() for m in consumer]
    consumer.close()
    return seen


def _committed(bootstrap: str, offsets: dict[int, int] | None = None) -> dict[int, int | None]:
    """Commit `offsets` for a consumer group (if given), then read the group's committed offsets back."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id="restart-probe", enable_auto_commit=False)
    parts = [TopicPartition("flywheel.feedback", p) for p in range(FEEDBACK_PARTS)]
    try:
        if offsets:
            consumer.commit({TopicPartition("flywheel.feedback", p): OffsetAndMetadata(o, "", -1)
                             for p, o in offsets.items()})
        return {tp.partition: consumer.committed(tp) for tp in parts}
    finally:
        consumer.close()


def _kill_every_stack_process() -> list[int]:
    """SIGKILL each component's process group, as a crash or an OOM kill would: no shutdown code runs."""
    killed = []
    for pid_file in (Path(os.environ["FLYWHEEL_VAR"]) / "run").glob("*.pid"):
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGKILL)
        killed.append(pid)
    deadline = time.monotonic() + 10
    while any(stack.pid_alive(p) for p in killed) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in killed if stack.pid_alive(p)]
    return killed


@pytest.mark.slow  # three stack start-ups: ~30 s
def test_acknowledged_events_survive_down_up_and_a_sigkill_of_every_process(own_stack):
    """Issue 13: 1,000 events acknowledged with acks=all, `down`, `up` -> all 1,000 on the topic, new
    records append after them, committed consumer offsets kept; then the same after SIGKILL."""
    bootstrap = f"127.0.0.1:{own_stack['kafka']}"
    assert _cli("up").returncode == 0
    first = [f"event-{i}" for i in range(1000)]
    _produce(bootstrap, first)
    committed = {0: 7, 1: 11, 2: 13}
    assert _committed(bootstrap, committed) == committed

    assert _cli("down").returncode == 0
    up = _cli("up")
    assert up.returncode == 0, up.stderr
    seen = _read_topic(bootstrap)
    assert len(seen) == 1000 and set(seen) == set(first)
    assert _committed(bootstrap) == committed

    # After the restart the broker must append, not start its partitions at offset 0 again.
    ends = {p: 0 for p in range(FEEDBACK_PARTS)}
    for md in _produce(bootstrap, [f"late-{i}" for i in range(200)]):
        ends[md.partition] = max(ends[md.partition], md.offset + 1)
    assert sum(ends.values()) == 1200

    _kill_every_stack_process()
    up = _cli("up")
    assert up.returncode == 0, up.stderr
    seen = _read_topic(bootstrap)
    assert len(seen) == 1200 and set(seen) == set(first) | {f"late-{i}" for i in range(200)}
    assert _committed(bootstrap) == committed


def test_port_in_use_fails_fast_naming_the_port(own_stack):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own_stack["kafka"]))
        squatter.listen(1)
        t0 = time.monotonic()
        result = _cli("up")
        elapsed = time.monotonic() - t0
    assert result.returncode == 2
    assert f"port 127.0.0.1:{own_stack['kafka']} is already in use" in result.stderr
    assert "FLYWHEEL_KAFKA_PORT" in result.stderr
    assert elapsed < 15, f"took {elapsed:.1f}s to fail"


def test_a_component_that_dies_at_start_names_its_log(own_stack, monkeypatch: pytest.MonkeyPatch):
    comp = stack.Component(name="broken", port=None, command=lambda: [sys.executable, "-c", "raise SystemExit(3)"],
                           healthy=lambda: False, endpoint="-", start_timeout=10)
    with pytest.raises(stack.StackError, match=r"broken exited with code 3 .*broken\.log"):
        comp.start()
