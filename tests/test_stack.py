"""The embedded stack with real processes: up, durability across a broker restart, port clash, down.

These start their own stack on fresh ports and a fresh var/ (not the shared `stack` fixture),
because they restart and stop it.
"""

from __future__ import annotations

import json
import os
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
