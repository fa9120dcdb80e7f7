"""Run a DAG as an operator would: through the Airflow 3 REST API, executed by the scheduler.

  python -m infra.airflow_api trigger preference_retrain --conf '{"base_model": "tiny"}' --wait
  python -m infra.airflow_api status preference_retrain manual__2026-12-02T05:00:00+00:00

`trigger` unpauses the DAG (a paused DAG's runs never start), creates a run with the given conf and,
with `--wait`, polls until it ends, printing each task as it finishes; the exit status is 0 only when
the run succeeded. The run's logical date is the trigger time, so the DAG's timetable gives it the last
full data interval (a run with no logical date has none; the DAGs then read the period before the
trigger, see dags/_flywheel.window).

Credentials: `FLYWHEEL_AIRFLOW_USER` / `FLYWHEEL_AIRFLOW_PASSWORD` for a deployment's auth manager;
without them, the token the embedded stack's all-admins simple auth manager hands out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from ingest import endpoints

FINISHED = {"success", "failed"}


class AirflowError(RuntimeError):
    """The API refused a request, or a run ended in failure."""


@dataclass
class AirflowAPI:
    base_url: str = field(default_factory=lambda: f"http://127.0.0.1:{endpoints.port('airflow')}")
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        self._http = httpx.Client(base_url=self.base_url, timeout=self.timeout_s)
        self._http.headers["Authorization"] = f"Bearer {self._token()}"

    def _token(self) -> str:
        user, password = os.environ.get("FLYWHEEL_AIRFLOW_USER"), os.environ.get("FLYWHEEL_AIRFLOW_PASSWORD")
        if user and password:
            r = self._http.post("/auth/token", json={"username": user, "password": password})
        else:
            r = self._http.get("/auth/token")
        return self._ok(r, "get an API token")["access_token"]

    @staticmethod
    def _ok(r: httpx.Response, what: str) -> dict:
        if r.status_code >= 400:
            raise AirflowError(f"Airflow refused to {what}: HTTP {r.status_code} {r.text[:500]}")
        return r.json()

    def wait_for_dag(self, dag_id: str, timeout_s: float = 120.0) -> dict:
        """The DAG as the API knows it, once the DAG processor has parsed it."""
        deadline = time.monotonic() + timeout_s
        while True:
            r = self._http.get(f"/api/v2/dags/{dag_id}")
            if r.status_code != 404:
                return self._ok(r, f"read DAG {dag_id}")
            if time.monotonic() > deadline:
                raise AirflowError(f"DAG {dag_id} was not parsed within {timeout_s:.0f}s (is the dag-processor up?)")
            time.sleep(2)

    def unpause(self, dag_id: str) -> None:
        self._ok(self._http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}), f"unpause {dag_id}")

    def trigger(self, dag_id: str, conf: dict, logical_date: datetime | None = None) -> str:
        """Create a run of `dag_id` with `conf`; returns its run id."""
        when = (logical_date or datetime.now(UTC)).isoformat()
        body = {"logical_date": when, "conf": conf, "note": "triggered by python -m infra.airflow_api"}
        return self._ok(self._http.post(f"/api/v2/dags/{dag_id}/dagRuns", json=body), f"trigger {dag_id}")["dag_run_id"]

    def run(self, dag_id: str, run_id: str) -> dict:
        return self._ok(self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}"), f"read run {run_id}")

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        out = self._ok(self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                                      params={"limit": 1000}), f"read the tasks of {run_id}")
        return {ti["task_id"]: ti["state"] for ti in out["task_instances"]}

    def wait(self, dag_id: str, run_id: str, timeout_s: float = 3600.0, poll_s: float = 3.0,
             on_task: Callable[[str, str], None] | None = None) -> dict[str, str | None]:
        """Poll until the run ends; `on_task(task_id, state)` for each task that reaches a final state.
        Returns the task states; raises AirflowError when the run failed or took longer than `timeout_s`."""
        deadline, reported = time.monotonic() + timeout_s, set()
        while True:
            state = self.run(dag_id, run_id)["state"]
            tasks = self.task_states(dag_id, run_id)
            for task_id, ti_state in tasks.items():
                if ti_state in {"success", "failed", "skipped", "upstream_failed"} and task_id not in reported:
                    reported.add(task_id)
                    if on_task:
                        on_task(task_id, ti_state)
            if state in FINISHED:
                if state == "failed":
                    failed = sorted(t for t, s in tasks.items() if s in ("failed", "upstream_failed"))
                    raise AirflowError(f"{dag_id} run {run_id} failed; failed tasks: {failed}")
                return tasks
            if time.monotonic() > deadline:
                raise AirflowError(f"{dag_id} run {run_id} still {state} after {timeout_s:.0f}s; tasks: {tasks}")
            time.sleep(poll_s)

    def start(self, dag_id: str, conf: dict) -> str:
        """Once the DAG is parsed: unpause it and trigger a run with `conf`; returns the run id."""
        self.wait_for_dag(dag_id)
        self.unpause(dag_id)
        return self.trigger(dag_id, conf)

    def trigger_and_wait(self, dag_id: str, conf: dict, timeout_s: float = 3600.0,
                         on_task: Callable[[str, str], None] | None = None) -> tuple[str, dict[str, str | None]]:
        run_id = self.start(dag_id, conf)
        return run_id, self.wait(dag_id, run_id, timeout_s=timeout_s, on_task=on_task)

    def close(self) -> None:
        self._http.close()


def _print_task(task_id: str, state: str) -> None:
    print(f"  {task_id}: {state}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.airflow_api",
                                     description="Trigger and follow DAG runs through the Airflow 3 REST API.")
    parser.add_argument("--url", default=None, help="API server (default: the embedded stack's)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_trig = sub.add_parser("trigger", help="unpause a DAG and create a run")
    p_trig.add_argument("dag_id")
    p_trig.add_argument("--conf", default="{}", help="the run's params as a JSON object")
    p_trig.add_argument("--wait", action="store_true", help="follow the run until it ends; exit 1 if it failed")
    p_trig.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait (default 3600)")
    p_stat = sub.add_parser("status", help="a run's state and its tasks' states")
    p_stat.add_argument("dag_id")
    p_stat.add_argument("run_id")
    args = parser.parse_args(argv)
    api = AirflowAPI(base_url=args.url) if args.url else AirflowAPI()
    try:
        if args.cmd == "status":
            run = api.run(args.dag_id, args.run_id)
            print(json.dumps({"state": run["state"], "tasks": api.task_states(args.dag_id, args.run_id)}, indent=2))
            return 0
        run_id = api.start(args.dag_id, json.loads(args.conf))
        print(f"triggered {args.dag_id}: {run_id}", flush=True)
        if args.wait:
            api.wait(args.dag_id, run_id, timeout_s=args.timeout, on_task=_print_task)
            print(f"{args.dag_id} {run_id}: success")
    except AirflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        api.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
