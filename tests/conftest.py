"""Shared fixtures: a real embedded stack on free ports, and the tiny model.

The `stack` fixture starts the real moto S3 server, the real tansu broker and a real MLflow server,
each on a free loopback port with its state in a temporary folder, so tests never touch (or
collide with) a developer's running `var/` stack. It points the environment variables of
ingest/endpoints.py at them, so every job under test finds them the way it would in production.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving_process(var: Path, config: str, *overrides: str, start_timeout: float = 60):  # noqa: ANN201 - yields the URL
    """`python -m serving --config config` with `overrides` as its own process (client and server share no GIL), on a
    free port, against the test stack; ready once /healthz says the producer is connected."""
    port = free_port()
    cmd = [sys.executable, "-m", "serving", "--config", config, f"http.port={port}", "http.token_secret=test-secret",
           "registry.enabled=false", f"events.spool_dir={var / 'spool'}", *overrides]
    with open(var / "server.log", "w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + start_timeout
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).json()["events"]["mode"] == "direct":
                break
        except (httpx.HTTPError, KeyError):
            pass
        assert proc.poll() is None, (var / "server.log").read_text()[-2000:]
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the server was not ready in {start_timeout} s: "
                                 + (var / "server.log").read_text()[-2000:])
        time.sleep(0.2)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class StackInfo:
    var: Path
    kafka: str
    mlflow: str
    ports: dict[str, int]


STACK_COMPONENTS = ("s3", "kafka", "mlflow")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """A real moto S3 + tansu + MLflow for the whole test session (started once, ~8 s)."""
    from infra import stack as stack_mod

    var = tmp_path_factory.mktemp("flywheel-var")
    ports = {name: free_port() for name in ("s3", "kafka", "mlflow", "airflow", "serving")}
    saved = {k: os.environ.get(k) for k in ("FLYWHEEL_VAR", "MLFLOW_TRACKING_URI", "FLYWHEEL_KAFKA_BOOTSTRAP",
                                            *(f"FLYWHEEL_{n.upper()}_PORT" for n in ports))}
    os.environ["FLYWHEEL_VAR"] = str(var)
    for name, port in ports.items():
        os.environ[f"FLYWHEEL_{name.upper()}_PORT"] = str(port)
    os.environ.pop("FLYWHEEL_KAFKA_BOOTSTRAP", None)
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{ports['mlflow']}"
    # Models live in the repo's var/models (built once by `make test`), not in the temp var.
    models = REPO / "var" / "models"
    (var / "models").symlink_to(models, target_is_directory=True) if models.exists() else None
    try:
        stack_mod.up(with_airflow=False)
        yield StackInfo(var=var, kafka=f"127.0.0.1:{ports['kafka']}",
                        mlflow=f"http://127.0.0.1:{ports['mlflow']}", ports=ports)
    finally:
        stack_mod.down()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Path of the tiny Llama (built by `make test`; built here if missing, ~15 s)."""
    from infra import models

    path = REPO / "var" / "models" / "tiny-llama"
    if not (path / "config.json").is_file():
        old = os.environ.pop("FLYWHEEL_VAR", None)
        try:
            models.build_tiny()
        finally:
            if old:
                os.environ["FLYWHEEL_VAR"] = old
    return str(path)


# Markers from what a test uses, not from a hand-kept list: any test that (directly or through another
# fixture) needs the stack is `stack`, any that needs a model is `model`, so `-m "not stack"` or
# `-m "not model"` select the fast tests reliably. `make test` runs everything.
FIXTURE_MARKERS = {"stack": "stack", "tiny_model": "model"}


# The two longest files (docs/performance.md): `make test` runs the suite on two workers (pytest-xdist,
# one file per worker at a time), and these start first so that the other files fill in around them
# instead of one of them starting last and running alone.
RUN_FIRST = ("test_loop.py", "test_spark_cluster.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(marker)
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay in one piece


_KILLER = """
import importlib, os, signal, sys
from ingest.config import parse_config
from training import common

class KillAfterStep(common.MlflowMetrics):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ["KILL_AT_STEP"]):
            os.kill(os.getpid(), signal.SIGKILL)  # a real kill -9, no cleanup

common.MlflowMetrics = KillAfterStep
job = importlib.import_module(sys.argv[1])
job.main(parse_config(job.Config, sys.argv[2:]))
"""


def run_killed_at_step(job: str, step: int, *args: str) -> subprocess.CompletedProcess:
    """Run training job `job` (e.g. "training.dpo") with `args` in a process that kill -9s itself at the
    end of training step `step`: what a crash mid-run leaves behind, for the resume tests."""
    return subprocess.run([sys.executable, "-c", _KILLER, job, *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "KILL_AT_STEP": str(step), "PYTHONPATH": str(REPO)}, timeout=300)

