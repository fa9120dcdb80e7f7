"""
### rollout — the users decide: promote the challenger, roll it back, or wait

Every 15 minutes (`FLYWHEEL_ROLLOUT_SCHEDULE_MIN` changes it): `training.rollout` reads the landed
events since the live canary began (up to the end of this run's data interval), counts for the
champion and the challenger the rated answers and their thumbs-up rate (primary) and the regenerate,
edit and abandon rates (guardrails), and runs an anytime-valid sequential test, so looking after every
interval does not inflate the error rates. Then it promotes the challenger (better, or non-inferior at
the maximum sample), rolls it back (worse, or a guardrail tripped), or waits and says how many more
rated answers it needs. Every decision is recorded in the registry (tags, `champion_history`) and in
the canary's MLflow run, with a plot of both arms' rates and their intervals.

Idempotent: a re-run of an interval that was already decided changes nothing. Run `feedback_ingest`
before it (in production the landing consumer runs continuously).
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DeltaDataIntervalTimetable, Param, dag, get_current_context, task

sys.path.insert(0, str(Path(__file__).parent))  # the shared helper next to this file, wherever it is mounted
from _flywheel import DEFAULT_ARGS, job, window  # noqa: E402

PERIOD = timedelta(minutes=int(os.environ.get("FLYWHEEL_ROLLOUT_SCHEDULE_MIN", "15")))


@dag(
    dag_id="rollout",
    schedule=DeltaDataIntervalTimetable(PERIOD),
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["flywheel", "rollout", "canary"],
    doc_md=__doc__,
    params={
        "window_end": Param("", type="string", description="ISO time; empty = the data interval's end"),
        "rollout_overrides": Param("", type="string", description="extra key=value for training.rollout"),
    },
)
def rollout():
    @task.bash
    def decide() -> str:
        ctx = get_current_context()
        _, end = window(ctx, PERIOD)
        return job("training.rollout", f"window_end={end}", *ctx["params"]["rollout_overrides"].split())

    decide()


rollout()
