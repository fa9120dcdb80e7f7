"""
### feedback_ingest — keep the landing zone current

Every 15 minutes: run the landing consumer until the topics are idle (`ingest.consume
until_idle=true`). It commits offsets only after each Parquet batch is durable and dedupes on
`event_id`, so a retry or an overlapping run lands nothing twice; malformed records go to the
dead-letter topic. In production the same consumer runs continuously as a Deployment; this DAG is
the batch mode for small installations and the demo. Then `live_metrics` logs, per adapter version,
the interval's thumbs-up, regenerate, edit, copy and abandon rates to MLflow (experiment
`flywheel-live`): the loop's health over time in the MLflow UI.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DeltaDataIntervalTimetable, Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, job, window  # noqa: E402

PERIOD = timedelta(minutes=15)


@dag(
    dag_id="feedback_ingest",
    # Data intervals (not trigger times): a run, manual ones included, covers the period before it.
    schedule=DeltaDataIntervalTimetable(PERIOD),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["flywheel", "ingest"],
    doc_md=__doc__,
    params={"consume_overrides": Param("", type="string", description="extra key=value for ingest.consume")},
)
def feedback_ingest():
    @task.bash
    def land_events() -> str:
        p = get_current_context()["params"]
        return job("ingest.consume", "until_idle=true", *p["consume_overrides"].split())

    @task.bash
    def live_metrics() -> str:
        start, end = window(get_current_context(), PERIOD)
        return job("ingest.live_metrics", f"start={start}", f"end={end}", "log_mlflow=true")

    land_events() >> live_metrics()


feedback_ingest()
