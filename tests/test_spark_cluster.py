"""The dataset builder on a real Spark standalone cluster: a master and two workers on loopback, started
with pyspark's own launcher (`bin/spark-class ...deploy.master.Master` / `...deploy.worker.Worker`) and
stopped by their PIDs. `python -m ingest.build_dataset` with spark_master=spark://... must produce the
same dataset version, byte for byte, as local[*]: the executors write the files, and which file a row
lands in depends on the row alone."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyspark
import pytest

from ingest import synthetic

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SPARK_CLASS = Path(pyspark.__file__).parent / "bin" / "spark-class"
WINDOW = ["start=2026-11-23T10:00:00Z", "end=2026-11-23T11:00:00Z"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"port {port} not open after {timeout_s} s: {log.read_text()[-2000:]}")


def _registered_workers(ui_port: int) -> int:
    import httpx

    try:
        return len(httpx.get(f"http://127.0.0.1:{ui_port}/json/", timeout=2).json().get("workers", []))
    except (httpx.HTTPError, ValueError):
        return 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """spark://127.0.0.1:<port> with two 1-core workers; every process stopped by its PID afterwards."""
    root = tmp_path_factory.mktemp("spark-cluster")
    env = {**os.environ, "SPARK_LOCAL_IP": "127.0.0.1", "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
           "SPARK_LOG_DIR": str(root / "logs"), "SPARK_WORKER_DIR": str(root / "work")}
    port, ui = _free_port(), _free_port()
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = root / f"{name}.log"
        proc = subprocess.Popen([str(SPARK_CLASS), *args], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc, log

    try:
        master, log = start("master", "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                            "--port", str(port), "--webui-port", str(ui))
        _wait_port(port, master, log)
        for i in range(2):
            start(f"worker{i}", "org.apache.spark.deploy.worker.Worker", f"spark://127.0.0.1:{port}",
                  "--host", "127.0.0.1", "--cores", "1", "--memory", "1g", "--webui-port", str(_free_port()),
                  "--work-dir", str(root / f"work{i}"))
        deadline = time.monotonic() + 90
        while _registered_workers(ui) < 2:
            assert time.monotonic() < deadline, (root / "worker0.log").read_text()[-2000:]
            time.sleep(0.5)
        yield {"url": f"spark://127.0.0.1:{port}", "env": env}
    finally:
        for proc in procs:  # our own processes, by PID
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _build(root: Path, out: str, env: dict, *overrides: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ingest.build_dataset", *WINDOW, f"landing_dir={root / 'landing'}",
                           f"datasets_dir={root / out}", "mlflow_log=false", *overrides],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), time.perf_counter() - t0


def test_cluster_build_equals_local_byte_for_byte(cluster: dict, tmp_path: Path) -> None:
    responses, feedback = synthetic.generate(300, n_users=20, n_prompts=30, seed=11)
    synthetic.land_rows(responses, feedback, tmp_path / "landing")

    local, local_s = _build(tmp_path, "local", cluster["env"], "spark_master=local[*]")
    remote, remote_s = _build(tmp_path, "cluster", cluster["env"], f"spark_master={cluster['url']}")
    print(f"\nbuild_dataset, {sum(len(x) for x in (responses, feedback))} events: local[*] {local_s:.1f} s, "
          f"standalone cluster (2 workers x 1 core) {remote_s:.1f} s")

    assert local["counts"]["dpo"]["train"] > 0, local
    assert remote["version"] == local["version"], (remote, local)
    files_local = json.loads(Path(local["manifest"]).read_text())["files"]
    files_remote = json.loads(Path(remote["manifest"]).read_text())["files"]
    assert files_remote == files_local and len(files_local) > 6  # several files per kind, the same bytes
    for rel in files_local:
        assert (tmp_path / "cluster" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel
