"""DAG integrity: every DAG imports in the real Airflow 3 environment, is documented, tagged, retried,
and parsing it loads no heavy library (the DAG processor parses these files every few seconds)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AIRFLOW_PY = REPO / ".venv-airflow" / "bin" / "python"
HEAVY = ("torch", "pyspark", "transformers", "peft", "trl", "mlflow", "datasets", "kafka")
DAG_FILES = sorted(p for p in (REPO / "dags").glob("*.py") if not p.name.startswith("_"))

PROBE = r"""
import json, sys
import pendulum
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.encoders import coerce_to_core_timetable
bag = DagBag(dag_folder=sys.argv[1])
now = pendulum.datetime(2026, 12, 2, 5, 7, tz="UTC")
def manual(d):  # the data interval a manual run at `now` gets, in seconds, and how far before `now` it ends
    i = coerce_to_core_timetable(d.timetable).infer_manual_data_interval(run_after=now)
    return [(i.end - i.start).total_seconds(), (now - i.end).total_seconds()]
heavy = sorted(m for m in sys.modules if m.split(".")[0] in sys.argv[2].split(","))
print(json.dumps({
    "import_errors": {k: v[-500:] for k, v in bag.import_errors.items()},
    "heavy_modules": heavy,
    "dags": {d.dag_id: {"tags": sorted(d.tags), "doc_md": bool(d.doc_md), "schedule": str(d.schedule),
                         "manual_interval": manual(d),
                         "tasks": {t.task_id: {"retries": t.retries, "pool": t.pool,
                                               "timeout_s": t.execution_timeout and t.execution_timeout.total_seconds()}
                                   for t in d.tasks}} for d in bag.dags.values()},
}))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags")}
    out = subprocess.run([str(AIRFLOW_PY), "-c", PROBE, str(REPO / "dags"), ",".join(HEAVY)], env=env,
                         capture_output=True, text=True, timeout=180, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_dag_imports_without_errors(dagbag: dict):
    assert dagbag["import_errors"] == {}
    assert {"feedback_ingest", "preference_retrain", "reward_model_ppo", "rollout"} <= set(dagbag["dags"])


def test_dags_are_documented_tagged_scheduled_and_retried(dagbag: dict):
    for dag_id, dag in dagbag["dags"].items():
        assert dag["tags"] and "flywheel" in dag["tags"], dag_id
        assert dag["doc_md"], f"{dag_id} has no doc_md"
        assert dag["schedule"] not in ("None", ""), f"{dag_id} has no explicit schedule"
        low = {t: v["retries"] for t, v in dag["tasks"].items() if v["retries"] < 2}
        assert not low, f"{dag_id}: tasks with retries < 2: {low}"


def test_every_task_has_a_timeout_and_training_shares_one_pool(dagbag: dict):
    for dag_id, dag in dagbag["dags"].items():
        unbounded = [t for t, v in dag["tasks"].items() if not v["timeout_s"]]
        assert not unbounded, f"{dag_id}: tasks without execution_timeout: {unbounded}"
    in_pool = {(d, t) for d, dag in dagbag["dags"].items() for t, v in dag["tasks"].items()
               if v["pool"] == "flywheel_training"}
    heavy = {(d, t) for d, dag in dagbag["dags"].items() for t in dag["tasks"]
             if t.startswith("train_") or (t == "evaluate")}
    assert heavy and in_pool == heavy, in_pool ^ heavy
    assert all(dagbag["dags"][d]["tasks"][t]["timeout_s"] >= 3600 for d, t in heavy)
    from infra import stack

    assert stack.TRAINING_POOL[:2] == ("flywheel_training", "1")  # the pool the stack creates, one slot


def test_a_manual_run_covers_the_whole_period_before_it(dagbag: dict):
    """Data-interval timetables: a run triggered by hand reads the last full period, not an empty one."""
    periods = {"feedback_ingest": 900, "rollout": 900, "preference_retrain": 86400, "reward_model_ppo": 7 * 86400}
    for dag_id, seconds in periods.items():
        length, ended_before = dagbag["dags"][dag_id]["manual_interval"]
        assert length == seconds and 0 <= ended_before < seconds, (dag_id, length, ended_before)


def test_a_run_without_a_data_interval_reads_the_period_before_it_was_triggered():
    import sys
    from datetime import UTC, datetime, timedelta
    from types import SimpleNamespace

    sys.path.insert(0, str(REPO / "dags"))
    from _flywheel import window

    run_after = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
    ctx = {"params": {}, "data_interval_start": None, "data_interval_end": None,
           "dag_run": SimpleNamespace(run_after=run_after)}
    assert window(ctx, timedelta(days=1)) == ("2026-12-01T05:00:00+00:00", "2026-12-02T05:00:00+00:00")
    given = {**ctx, "data_interval_start": run_after - timedelta(hours=2), "data_interval_end": run_after}
    assert window(given, timedelta(days=1))[0] == "2026-12-02T03:00:00+00:00"
    assert window({**given, "params": {"window_start": "2026-11-30T00:00:00+00:00"}},
                  timedelta(days=1)) == ("2026-11-30T00:00:00+00:00", "2026-12-02T05:00:00+00:00")


def test_parsing_loads_no_heavy_library(dagbag: dict):
    assert dagbag["heavy_modules"] == []


@pytest.mark.parametrize("path", DAG_FILES, ids=lambda p: p.name)
def test_no_top_level_heavy_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in tree.body:  # module level only; imports inside task functions run on workers
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        bad = [n for n in names if n.split(".")[0] in HEAVY]
        assert not bad, f"{path.name} imports {bad} at module level"


def test_retrain_dags_start_a_canary_and_never_promote(dagbag: dict):
    """The offline gate only decides who may be tried; promotion is the rollout's, on live feedback."""
    for dag_id in ("preference_retrain", "reward_model_ppo"):
        tasks = set(dagbag["dags"][dag_id]["tasks"])
        assert "start_canary" in tasks and "promote" not in tasks, (dag_id, tasks)
    assert "train_reward_model" in dagbag["dags"]["preference_retrain"]["tasks"]


def _plan(dpo: int, kto: int, sft: int = 0, **kw) -> dict:  # noqa: ANN003
    import sys

    sys.path.insert(0, str(REPO / "dags"))
    from _flywheel import retrain_plan

    built = {"counts": {"dpo": {"train": dpo}, "kto": {"train": kto}, "sft": {"train": sft}},
             "min_rows": {"dpo_train": 16, "kto_train": 32}}
    return retrain_plan(built, **kw)


def test_retrain_plan_trains_dpo_with_enough_pairs_else_kto_else_nothing():
    assert _plan(16, 0) | {"reason": ""} == {"trainer": "dpo", "judge": "reward_model", "sft": False, "reason": ""}
    kto = _plan(15, 32)
    assert (kto["trainer"], kto["judge"]) == ("kto", "none") and "only 15 train pairs" in kto["reason"]
    assert _plan(15, 31)["trainer"] is None and _plan(0, 0)["sft"] is False
    assert _plan(20, 0, sft=16, sft_first=True)["sft"] is True
    assert _plan(20, 0, sft=15, sft_first=True)["sft"] is False  # too few SFT rows: straight to DPO
    assert _plan(20, 0, sft=99)["sft"] is False  # not asked for
    assert _plan(0, 0, sft=99, sft_first=True)["sft"] is False  # nothing to continue into


def test_retrain_dag_falls_back_to_kto_and_can_run_sft_first(dagbag: dict):
    tasks = set(dagbag["dags"]["preference_retrain"]["tasks"])
    assert {"plan", "train_sft", "which_trainer", "train_dpo", "train_kto"} <= tasks, tasks

