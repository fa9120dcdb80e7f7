"""
### feedback_ingest — keep the landing zone current

Every 15 minutes: run the landing consumer until the topics are idle (`ingest.consume
until_idle=true`). It commits offsets only after each Parquet batch is durable and dedupes on
`event_id`, so a retry or an overlapping run lands nothing twice; malformed records go to the
dead-letter topic. In production the same consumer runs continuously as a Deployment; this DAG is
the batch mode for small installations and the demo.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, job  # noqa: E402


@dag(
    dag_id="feedback_ingest",
    schedule=timedelta(minutes=15),
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

    land_events()


feedback_ingest()
