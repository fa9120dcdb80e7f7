"""Shared by the DAG files: how a task runs a Flywheel job, and how it reads a job's answer.

Every task is a process of the project's own environment (`.venv/bin/python -m <job>`), exactly as
a KubernetesPodOperator would run the job's image in production. Jobs print their result as one
JSON object on the last stdout line; BashOperator pushes that line to XCom. Nothing here imports
torch, Spark or MLflow: the DAG processor only parses these files.
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import timedelta
from pathlib import Path

REPO = Path(os.environ.get("FLYWHEEL_REPO", Path(__file__).resolve().parent.parent))
PYTHON = os.environ.get("FLYWHEEL_PYTHON", str(REPO / ".venv" / "bin" / "python"))

# One slot (`python -m infra.stack` creates it; `airflow pools set flywheel_training 1 ...` elsewhere):
# tasks that train or evaluate a model share one accelerator, so two training DAGs never train at once.
TRAINING_POOL = "flywheel_training"

DEFAULT_ARGS = {
    "owner": "flywheel",
    "retries": 2,
    "retry_delay": timedelta(minutes=1),
    # A hung job (a broker that never answers, a stuck collective) fails and is retried instead of
    # holding its slot forever; jobs that train say how long they may take (`TRAINING`).
    "execution_timeout": timedelta(minutes=30),
}

# For the tasks that train or evaluate: the pool, and room for SmolLM2 on a slow CPU (a DPO epoch on
# an AVX2 machine takes tens of minutes; a GPU run of a larger model, hours).
TRAINING = {"pool": TRAINING_POOL, "execution_timeout": timedelta(hours=6)}


def job(module: str, *args: str) -> str:
    """The bash command of one job; arguments are shell-quoted unless they hold a Jinja expression."""
    quoted = [a if "{{" in a else shlex.quote(a) for a in args]
    return f"set -euo pipefail; cd {shlex.quote(str(REPO))}; {shlex.quote(PYTHON)} -m {module} {' '.join(quoted)}"


def answer(xcom_line: str | None) -> dict:
    """Parse a job's last stdout line (its JSON answer); fail loudly when it is not JSON."""
    if not xcom_line:
        raise ValueError("the upstream job printed nothing; its last stdout line must be a JSON object")
    try:
        out = json.loads(xcom_line)
    except json.JSONDecodeError:
        raise ValueError(f"the upstream job's last stdout line is not JSON: {xcom_line[:200]!r}") from None
    if not isinstance(out, dict):
        raise ValueError(f"the upstream job's answer is not a JSON object: {xcom_line[:200]!r}")
    return out


def window(ctx: dict, period: timedelta) -> tuple[str, str]:
    """The run's data window as ISO times: params window_start/window_end where given, else the data
    interval. A run without one (triggered through the REST API with no logical date) covers the
    `period` before it was triggered, as a scheduled run would."""
    p = ctx["params"]
    start, end = ctx.get("data_interval_start"), ctx.get("data_interval_end")
    if start is None or end is None or start >= end:
        end = ctx["dag_run"].run_after
        start = end - period
    return p.get("window_start") or start.isoformat(), p.get("window_end") or end.isoformat()


def build_dataset_command(ctx: dict, period: timedelta) -> str:
    """`ingest.build_dataset` for the run's window (`window`)."""
    start, end = window(ctx, period)
    return job("ingest.build_dataset", f"start={start}", f"end={end}", *ctx["params"].get("dataset_overrides", "").split())


def retrain_plan(built: dict, sft_first: bool = False, min_sft_rows: int = 16) -> dict:
    """What `preference_retrain` trains on a dataset version, from the builder's answer (counts, min_rows):

    - DPO when the train split has enough pairs, judged by a reward model trained on the same pairs;
    - else KTO when it has enough rated answers without a partner, judged by nothing offline (a reward
      model needs pairs; with too few its verdict is noise, so the gate reports "no offline evidence"
      and the canary's users decide);
    - else nothing (`trainer` None).
    `sft` says whether SFT on the edits and strong positives runs first (asked for, and enough rows).
    """
    counts, mins = built.get("counts", {}), built.get("min_rows", {})
    n = {kind: counts.get(kind, {}).get("train", 0) for kind in ("dpo", "kto", "sft")}
    if n["dpo"] >= mins.get("dpo_train", 16):
        trainer, reason = "dpo", f"{n['dpo']} train pairs"
    elif n["kto"] >= mins.get("kto_train", 32):
        trainer, reason = "kto", f"only {n['dpo']} train pairs but {n['kto']} unpaired rated answers"
    else:
        trainer, reason = None, f"{n['dpo']} pairs and {n['kto']} unpaired rated answers: too few to train on"
    sft = bool(trainer and sft_first and n["sft"] >= min_sft_rows)
    return {"trainer": trainer, "judge": "reward_model" if trainer == "dpo" else "none", "sft": sft,
            "reason": reason + (f"; SFT first on {n['sft']} rows" if sft else "")}

